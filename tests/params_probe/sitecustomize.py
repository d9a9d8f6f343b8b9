"""Put on PYTHONPATH by tests/test_dvc_pipeline.py: each process that imports ``pipeline.config`` records the
configuration fields it reads after ``load_config`` returns (attribute reads, and whole sub-trees it dumps) and
writes them, as dotted params.yaml keys, to $CROSSSIM_PARAMS_READ at exit. What a DVC stage reads is what it must
list under ``params``."""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.util
import json
import os
import sys
import types
import typing

_OUT = os.environ.get("CROSSSIM_PARAMS_READ")
_read: set[str] = set()
_recording = [False]


def _model_classes(annotation: object, base: type) -> list[type]:
    if isinstance(annotation, type) and issubclass(annotation, base):
        return [annotation]
    return [cls for arg in typing.get_args(annotation) for cls in _model_classes(arg, base)]


def _instrument(module: types.ModuleType) -> None:
    from pydantic import BaseModel

    prefixes: dict[type, str] = {module.PipelineConfig: ""}

    def walk(cls: type, prefix: str) -> None:
        for name, field in cls.model_fields.items():
            for sub in _model_classes(field.annotation, BaseModel):
                prefixes.setdefault(sub, f"{prefix}{name}.")
                walk(sub, f"{prefix}{name}.")

    walk(module.PipelineConfig, "")
    for cls, prefix in prefixes.items():
        fields = frozenset(cls.model_fields)
        # reading a section is not reading its values: only leaves count (a dumped section counts whole)
        leaves = frozenset(n for n, f in cls.model_fields.items() if not _model_classes(f.annotation, BaseModel))
        dump = cls.model_dump

        def getattribute(self, name, _fields=leaves, _prefix=prefix):
            if _recording[0] and name in _fields:
                _read.add(_prefix + name)
            return object.__getattribute__(self, name)

        def model_dump(self, *args, _fields=fields, _prefix=prefix, _dump=dump, **kwargs):
            if _recording[0]:
                include = kwargs.get("include")
                _read.update(_prefix + name for name in (include if include is not None else _fields) if name in _fields)
            return _dump(self, *args, **kwargs)

        cls.__getattribute__ = getattribute
        cls.model_dump = model_dump
    load_config = module.load_config

    def recording_load_config(*args, **kwargs):
        config = load_config(*args, **kwargs)
        _recording[0] = True
        return config

    module.load_config = recording_load_config


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "pipeline.config":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _instrument(module)

        spec.loader.exec_module = exec_module
        return spec


def _write() -> None:
    if _read:
        with open(_OUT, "a") as out:
            out.write(json.dumps(sorted(_read)) + "\n")


if _OUT:
    sys.meta_path.insert(0, _AfterImport())
    atexit.register(_write)
