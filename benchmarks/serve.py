"""make bench-serve: `crosssim serve` (ONNX Runtime FP32 and INT8) vs `mlflow models serve` vs PyTorch eager.

The same registered version (default: the registry's champion, else its challenger), the same real images
(the original files of the source test split and of the CrossSim target-test set of the run that registered
it). Each HTTP server runs as its own process on loopback and gets a bounded load from an async aiohttp client
at each concurrency: requests/s, p50 and p99 latency. PyTorch eager runs in this process (decode, preprocess
and forward per request, one thread per concurrent caller). Then each artifact's AUC on every evaluation set
of the gate, and ONNX Runtime INT8 against PyTorch eager in process (batch 1).

    python benchmarks/serve.py [--version N | --alias A] [--only crosssim-fp32,crosssim-int8,mlflow,eager]
                               [--concurrency 1 8 32] [--requests 400] [--smoke] [--output FILE] [--set k=v ...]

`mlflow models serve` gets its input already decoded and preprocessed (a JSON tensor built before the clock
starts): the comparison favours it. --smoke: a few requests per level, concurrency 1 and 4, JSON to a temp folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version as package_version
from pathlib import Path

import aiohttp
import mlflow
import numpy as np
import torch
from bench_cli import run_benchmark
from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.table import Table
from servers import free_port, running_server

from pipeline.config import load_config
from pipeline.data.images import decode_image
from pipeline.data.prepare import open_prepared
from pipeline.data.preprocessing import Preprocessing
from pipeline.evaluation import binary_metrics
from pipeline.registry.store import ModelRegistry
from pipeline.retrain.promotion import gate_sets
from pipeline.serving.bundle import ARTIFACT_URI_TAG, read_bundle
from pipeline.serving.runtime import onnx_probabilities, onnx_session, torch_probabilities
from pipeline.tracking import resolve_tracking_uri

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "serve.json"
CROSSSIM = str(Path(sys.executable).parent / "crosssim")
MLFLOW = str(Path(sys.executable).parent / "mlflow")
SERVERS = ("crosssim-fp32", "crosssim-int8", "mlflow", "eager")
REQUEST_IMAGES = 64  # per site: cycled through by the load
console = Console()


async def _load(send, payloads: list, concurrency: int, requests: int) -> dict:
    """``requests`` calls of ``send(client, payload)`` with at most ``concurrency`` in flight."""
    # aiohttp, not httpx: on 2 shared cores httpx's own CPU use at concurrency 32 (about a core) capped every server.
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as client:
        for index in range(min(concurrency * 2, requests)):  # warm-up: connections, first-batch costs
            await send(client, payloads[index % len(payloads)])
        gate = asyncio.Semaphore(concurrency)
        latencies: list[float] = []
        failures = 0

        async def one(index: int) -> None:
            nonlocal failures
            async with gate:
                started = time.perf_counter()
                ok = await send(client, payloads[index % len(payloads)])
                latencies.append((time.perf_counter() - started) * 1000)
                failures += not ok

        started = time.perf_counter()
        await asyncio.gather(*(one(index) for index in range(requests)))
        elapsed = time.perf_counter() - started
    return _summary(latencies, elapsed, failures)


def _summary(latencies: list[float], elapsed: float, failures: int) -> dict:
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "requests": len(latencies),
        "failed": failures,
    }


def _crosssim_sender(base_url: str):
    async def send(client: aiohttp.ClientSession, path: Path) -> bool:
        form = aiohttp.FormData()
        form.add_field("file", path.read_bytes(), filename=path.name)
        async with client.post(f"{base_url}/v1/predict", data=form) as response:
            await response.read()
            return response.status == 200

    return send


def _mlflow_sender(base_url: str):
    async def send(client: aiohttp.ClientSession, body: bytes) -> bool:
        async with client.post(f"{base_url}/invocations", data=body, headers={"Content-Type": "application/json"}) as response:
            await response.read()
            return response.status == 200

    return send


def _eager_load(model: torch.nn.Module, paths: list[Path], preprocessing: Preprocessing, concurrency: int, requests: int) -> dict:
    def one(index: int) -> float:
        started = time.perf_counter()
        pixels = preprocessing.model_input(decode_image(paths[index % len(paths)]))
        with torch.inference_mode():
            model(torch.from_numpy(pixels[None]))
        return (time.perf_counter() - started) * 1000

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(min(concurrency * 2, requests))))
        started = time.perf_counter()
        latencies = list(pool.map(one, range(requests)))
        elapsed = time.perf_counter() - started
    return _summary(latencies, elapsed, 0)


def _images_per_second(run_one, images: np.ndarray, seconds: float = 5.0) -> float:
    """Batch-1 calls on preprocessed images, for ``seconds``: in-process inference speed alone."""
    for image in images[:10]:
        run_one(image)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run_one(images[count % len(images)])
        count += 1
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", help="Registered version to serve (default: --alias).")
    parser.add_argument("--alias", default=None, help="Alias to serve (default: champion, else challenger).")
    parser.add_argument("--only", default=",".join(SERVERS), help=f"Comma-separated subset of {','.join(SERVERS)}.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=400, help="Timed requests per server and concurrency.")
    parser.add_argument("--smoke", action="store_true", help="Seconds, not minutes: CI checks the benchmark runs.")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.smoke:
        args.concurrency, args.requests = [1, 4], 12
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(SERVERS))
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {','.join(SERVERS)}")
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    output = args.output or (work / RESULT.name if args.smoke else RESULT)
    started = time.perf_counter()

    cfg = load_config(REPO / "params.yaml", args.overrides)
    uri = resolve_tracking_uri(cfg.tracking)
    name = cfg.serve.model_name or cfg.registry.model_name
    registry = ModelRegistry(uri)
    if args.version:
        served = registry.version(name, args.version)
    else:
        aliases = [args.alias] if args.alias else ["champion", "challenger"]
        served = next((v for v in (registry.find(name, alias) for alias in aliases) if v is not None), None)
        if served is None:
            sys.exit(f"no {name} version with alias {' or '.join(aliases)}: run `make run` first (it registers one)")
    if ARTIFACT_URI_TAG not in served.tags:
        sys.exit(f"{name} v{served.version} has no serving bundle (registered before serving artifacts existed)")
    mlflow.set_tracking_uri(uri)
    bundle_dir = Path(mlflow.artifacts.download_artifacts(served.tags[ARTIFACT_URI_TAG], dst_path=str(work / "bundle")))
    bundle = read_bundle(bundle_dir)
    preprocessing = bundle.preprocessing
    run = MlflowClient(uri).get_run(served.run_id)
    run_cfg = cfg.in_run_folder(Path(run.data.tags["run_folder"]))
    sets = gate_sets(run_cfg, preprocessing)
    paths = []
    for site in (run_cfg.data.source, run_cfg.crosssim.target):
        manifest = open_prepared(run_cfg.data.prepared_site(site)).manifest
        rows = manifest[manifest["split"] == "test"] if site == run_cfg.data.source else manifest
        paths += [Path(p) for p in rows["path"].head(REQUEST_IMAGES)]
    twin = mlflow.pytorch.load_model(f"models:/{name}/{served.version}", map_location="cpu")  # a torch.export program: eval already
    torch.set_num_threads(os.cpu_count() or 1)

    sessions = {precision: onnx_session(bundle.path_of(bundle_dir, precision)) for precision in bundle.artifacts}
    auc = {"pytorch": {}, **{f"onnx-{precision}": {} for precision in sessions}}
    for set_name, (images, labels) in sets.items():
        auc["pytorch"][set_name] = binary_metrics(labels, torch_probabilities(twin, images), 0.5)["auc"]
        for precision, session in sessions.items():
            auc[f"onnx-{precision}"][set_name] = binary_metrics(labels, onnx_probabilities(session, images), 0.5)["auc"]
    probe = np.concatenate([images for images, _ in sets.values()])[:256]
    in_process = {"pytorch_eager": _images_per_second(lambda image: torch_probabilities(twin, image[None]), probe)}
    for precision, session in sessions.items():
        in_process[f"onnx_{precision}"] = _images_per_second(lambda image, s=session: onnx_probabilities(s, image[None]), probe)

    env = {key: value for key, value in os.environ.items() if key != "CROSSSIM_API_KEY"} | {"MLFLOW_TRACKING_URI": uri}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # mlflow execs `uvicorn` by name
    results: dict[str, dict[str, dict]] = {}
    for server in only:
        results[server] = {}
        if server == "eager":
            for concurrency in args.concurrency:
                results[server][str(concurrency)] = _eager_load(twin, paths, preprocessing, concurrency, args.requests)
            continue
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        if server.startswith("crosssim"):
            if server.split("-")[1] not in bundle.artifacts:
                console.print(f"[yellow]{server}: skipped, the version has no such artifact ({'; '.join(bundle.notes)})")
                del results[server]
                continue
            settings = [f"serve.precision={server.split('-')[1]}", f"serve.port={port}", f"serve.version={served.version}",
                        f"serve.ledger_path={work / server / 'ledger.db'}", f"serve.image_store={work / server / 'images'}",
                        f"serve.model_name={name}", *args.overrides]  # fmt: skip
            command = [CROSSSIM, "serve", "--config", str(REPO / "params.yaml"), *(a for s in settings for a in ("--set", s))]
            context, send, payloads = running_server(command, f"{base}/readyz", env, work / f"{server}.log"), _crosssim_sender(base), paths
        else:
            command = [MLFLOW, "models", "serve", "-m", f"models:/{name}/{served.version}", "--env-manager", "local",
                       "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
            payloads = [json.dumps({"inputs": preprocessing.model_input(decode_image(path))[None].tolist()}).encode() for path in paths]
            context, send = running_server(command, f"{base}/ping", env, work / "mlflow.log"), _mlflow_sender(base)
        with context:
            for concurrency in args.concurrency:
                results[server][str(concurrency)] = asyncio.run(_load(send, payloads, concurrency, args.requests))

    def rps(server: str, concurrency: int) -> float | None:
        return results.get(server, {}).get(str(concurrency), {}).get("rps")

    ratios = {
        server: {str(c): rps(server, c) / rps("mlflow", c) for c in args.concurrency if rps(server, c) and rps("mlflow", c)}
        for server in ("crosssim-fp32", "crosssim-int8")
    }
    int8_loss = {s: auc["pytorch"][s] - auc["onnx-int8"][s] for s in sets} if "onnx-int8" in auc else None
    report = {
        "benchmark": "serve",
        "command": f"make bench-{'smoke' if args.smoke else 'serve'}  # python benchmarks/serve.py " + shlex.join(sys.argv[1:]),
        "smoke": args.smoke,
        "model": {"name": name, "version": str(served.version), "backbone": bundle.backbone, "image_size": preprocessing.image_size, "harmonisation": preprocessing.harmonisation,
                  "artifacts": {p: {"file": i.file, "sha256": i.sha256,
                                    "bytes": (bundle_dir / i.file).stat().st_size} for p, i in bundle.artifacts.items()},
                  "notes": bundle.notes},  # fmt: skip
        "request_images": {"files": len(paths), "from": [run_cfg.data.source + "/test", run_cfg.crosssim.target]},
        "servers": results,
        "rps_ratio_vs_mlflow": ratios,
        "in_process_images_per_second_batch1": in_process,
        "int8_speedup_vs_eager": in_process["onnx_int8"] / in_process["pytorch_eager"] if "onnx_int8" in in_process else None,
        "auc": auc,
        "int8_auc_loss": int8_loss,
        "int8_auc_loss_max": max(int8_loss.values()) if int8_loss else None,
        "wall_seconds": time.perf_counter() - started,
        "seed": cfg.seed,
        "hardware": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "gpu": None},  # CPU serving
        "versions": {pkg: package_version(pkg) for pkg in ("torch", "onnxruntime", "mlflow", "fastapi", "uvicorn", "aiohttp")}
        | {"python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str) + "\n")

    table = Table(title=f"Serving {name} v{served.version} ({bundle.backbone}, {preprocessing.describe()}) on {os.cpu_count()} CPU cores")
    for column in ("server", "concurrency", "req/s", "p50 ms", "p99 ms", "failed"):
        table.add_column(column)
    for server, levels in results.items():
        for concurrency, row in levels.items():
            table.add_row(server, concurrency, f"{row['rps']:.1f}", f"{row['p50_ms']:.1f}", f"{row['p99_ms']:.1f}", str(row["failed"]))
    console.print(table)
    console.print(f"AUC: {json.dumps(auc, indent=None)}")
    console.print(f"in process (batch 1, img/s): {json.dumps({k: round(v, 1) for k, v in in_process.items()})}")
    console.print(f"req/s vs mlflow: {json.dumps(ratios)} | wall {report['wall_seconds'] / 60:.1f} min | written {output}")


if __name__ == "__main__":
    run_benchmark(main)
