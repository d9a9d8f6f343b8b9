"""The site's secret DICOM de-identification salt, read from the environment.

Its own small module: reading a dataset (validate, prepare) needs it without the ingest machinery.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from pipeline.config import IngestConfig
from pipeline.errors import ConfigError

MIN_SALT_CHARS = 16
PUBLIC_SALT = "crosssim"  # read_dataset's default before it required a salt: public, so refused


def salt_variables(site: str, settings: IngestConfig) -> tuple[str, str]:
    """The environment variables that may hold the site's salt, most specific first."""
    return f"{settings.salt_env}_{re.sub(r'[^A-Z0-9]', '_', site.upper())}", settings.salt_env


def resolve_salt(site: str, settings: IngestConfig, environ: Mapping[str, str]) -> str | None:
    """The site's secret DICOM salt from the environment (None when unset); a guessable one is refused.

    Pseudonyms are HMACs of patient IDs: with a public salt anyone could recompute them from an MRN.
    """
    for variable in salt_variables(site, settings):
        salt = environ.get(variable, "")
        if not salt:
            continue
        if salt == PUBLIC_SALT or len(salt) < MIN_SALT_CHARS:
            raise ConfigError(
                f"${variable} is not a usable secret: use at least {MIN_SALT_CHARS} random characters "
                "(e.g. `openssl rand -hex 32`), kept out of the repository"
            )
        return salt
    return None
