"""Whether taskd traces (README, "Tracing (OpenTelemetry)"), decided without importing
OpenTelemetry: a daemon that does not trace never loads it.

Tracing is on with `otel = true` in taskd.toml, off with `otel = false`, and otherwise on
when the standard variables name where spans go: `OTEL_TRACES_EXPORTER` (not "none"),
`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`. `OTEL_SDK_DISABLED=true`
turns it off whatever else says. The spans themselves are taskd.otel's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from taskd.config import OTEL_MISSING, ConfigError, otel_installed

if TYPE_CHECKING:
    from taskd.otel import Tracing

logger = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def tracing_wanted(setting: bool | None, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether taskd should trace, from `otel` in taskd.toml and the OTEL_* variables."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if setting is not None:
        return setting
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return any(environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def check_tracing(setting: bool | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """For `taskd --check`: ConfigError if tracing would stop taskd's start; else a line
    saying whether taskd would trace."""
    if not tracing_wanted(setting, environ):
        return None
    if not otel_installed():
        if setting:
            raise ConfigError(f"otel = true: {OTEL_MISSING}")
        return f"OTEL_* variables ask for traces, but {OTEL_MISSING}: taskd would run untraced"
    from taskd.otel import exporter_entries

    names = ", ".join(name for name, _ in exporter_entries(environ)) or "none"
    return f"tracing: on, exporting to {names}"


def start_tracing(setting: bool | None, environ: Mapping[str, str] = os.environ) -> Tracing | None:
    """The tracer of this daemon if it traces, else None (and nothing is imported).

    Raises ConfigError if `otel = true` and the extra is missing, or the OTEL_* variables
    ask for an exporter that is not installed. Asked for only by OTEL_* variables (which may
    be set for other programs too), a missing extra is a warning, and taskd runs untraced.
    """
    if not tracing_wanted(setting, environ):
        return None
    if not otel_installed():
        if setting:
            raise ConfigError(f"otel = true: {OTEL_MISSING}")
        logger.warning(
            "OTEL_* variables ask for traces, but %s; taskd runs without tracing (set "
            "otel = false in taskd.toml to say so)",
            OTEL_MISSING,
        )
        return None
    from taskd.otel import Tracing

    return Tracing.from_environment(environ)
