"""Optional live views of a run: TensorBoard and Weights & Biases, both off by default.

RUN_DIR/metrics.jsonl stays the source of truth (train.py writes it); these sinks mirror each
record so a run can be watched while it goes. Each sink gets the same record dict the JSONL
line is made of, and logs every finite numeric field under its own name.

    logging:
      tensorboard: true          # event files in RUN_DIR/tb
      wandb: true                # a run in RUN_DIR/wandb
      wandb_project: megaloop
      wandb_mode: offline        # offline | online | disabled; offline needs no network

Only the main rank creates sinks. A backend switched on but not installed is a ConfigError that
names the fix (pip install megaloop[logging]), raised before training starts.
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Protocol, runtime_checkable

from .config import ConfigError, LoggingConfig

INSTALL_HINT = "pip install 'megaloop[logging]'"
WANDB_MODES = ("offline", "online", "disabled")


@runtime_checkable
class MetricSink(Protocol):
    def log(self, record: dict, step: int) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict) -> dict[str, float]:
    """The finite numbers of a record, minus the step itself (it is the x-axis, not a series).

    Non-numeric fields (None mfu without a known peak, strings) are skipped rather than failing:
    a live view must never stop a run.
    """
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class TensorBoardSink:
    """Scalars into RUN_DIR/tb through torch.utils.tensorboard (needs the tensorboard package)."""

    def __init__(self, log_dir: str, config: Optional[dict] = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(f"logging.tensorboard is true but tensorboard is not installed: {INSTALL_HINT}, "
                              f"or set logging.tensorboard=false") from None
        self.writer = SummaryWriter(log_dir=log_dir)
        if config:  # the resolved config as text, so the dashboard says what the run was
            import yaml
            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log(self, record: dict, step: int) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbSink:
    """A Weights & Biases run in RUN_DIR/wandb. Offline mode writes locally and never touches
    the network (sync later with `wandb sync RUN_DIR/wandb/offline-run-*`)."""

    def __init__(self, run_dir: str, project: str, mode: str, config: Optional[dict] = None,
                 name: Optional[str] = None):
        if mode not in WANDB_MODES:
            raise ConfigError(f"logging.wandb_mode={mode!r} is unknown: use one of {', '.join(WANDB_MODES)}")
        try:
            import wandb
        except ImportError:
            raise ConfigError(f"logging.wandb is true but wandb is not installed: {INSTALL_HINT}, "
                              f"or set logging.wandb=false") from None
        self._wandb = wandb
        settings: Any = None
        if mode == "offline":
            # No background service probing for a network, no console capture fighting tqdm.
            settings = wandb.Settings(console="off", x_disable_stats=True, silent=True)
        self.run = wandb.init(project=project, dir=run_dir, mode=mode, config=config or {},
                              name=name or os.path.basename(os.path.normpath(run_dir)),
                              reinit="create_new", settings=settings)

    def log(self, record: dict, step: int) -> None:
        self.run.log(scalars(record), step=step)

    def close(self) -> None:
        self.run.finish()


def check_backends(logging_cfg: LoggingConfig) -> None:
    """Raise the ConfigError build_sinks would, without creating anything: call it with the other
    up-front checks, before the run directory is touched."""
    import importlib.util

    if logging_cfg.wandb and logging_cfg.wandb_mode not in WANDB_MODES:
        raise ConfigError(f"logging.wandb_mode={logging_cfg.wandb_mode!r} is unknown: use one of {', '.join(WANDB_MODES)}")
    for on, module, key in ((logging_cfg.tensorboard, "tensorboard", "tensorboard"), (logging_cfg.wandb, "wandb", "wandb")):
        if on and importlib.util.find_spec(module) is None:
            raise ConfigError(f"logging.{key} is true but {module} is not installed: {INSTALL_HINT}, "
                              f"or set logging.{key}=false")


def build_sinks(logging_cfg: LoggingConfig, run_dir: str, config_dict: Optional[dict] = None) -> list[MetricSink]:
    """The sinks the config switches on (none by default). Call on the main rank only."""
    sinks: list[MetricSink] = []
    try:
        if logging_cfg.tensorboard:
            sinks.append(TensorBoardSink(os.path.join(run_dir, "tb"), config_dict))
        if logging_cfg.wandb:
            sinks.append(WandbSink(run_dir, logging_cfg.wandb_project, logging_cfg.wandb_mode, config_dict))
    except BaseException:
        close_sinks(sinks)  # do not leave a half-opened writer behind a config error
        raise
    return sinks


def close_sinks(sinks: list[MetricSink]) -> None:
    """Close every sink; one failing close must not keep the others (or the run) from finishing."""
    for sink in sinks:
        try:
            sink.close()
        except Exception:  # noqa: BLE001 - a live view's shutdown must not mask the run's outcome
            pass
