"""Tuned step schedules: K timesteps chosen for one model and one sampler (``fastdiff tune-steps``).

A tuned schedule changes only which timesteps a deterministic sampler visits, so only the rows
of its :class:`~fastdiff.schedulers.StepTable` (:func:`~fastdiff.schedulers.step_table` with
``timesteps=``); the step itself is unchanged. The file (``schedules/<sampler>-<K>.json`` in a
model folder, :mod:`fastdiff.models.folders`) records the timesteps, the model's weights hash
(a schedule tuned for other weights is refused), the errors before/after and the settings.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastdiff.files import atomic_write
from fastdiff.schedulers.timesteps import check_timesteps

FORMAT = "fastdiff-tuned-schedule"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TunedSchedule:
    """``timesteps`` (descending) for ``sampler`` (a ``--sampler`` name) on the model whose
    weights hash is ``weights_sha256``. ``errors``: ode_error before/after on the calibration
    and evaluation sets; ``settings``: how it was tuned."""

    sampler: str
    timesteps: tuple[int, ...]
    num_timesteps: int
    weights_sha256: str
    errors: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    @property
    def calls(self) -> int:
        return len(self.timesteps)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **asdict(self)}, indent=2) + "\n"


def file_name(sampler: str, calls: int) -> str:
    return f"{sampler}-{calls}.json"


def save_tuned(path: Path, tuned: TunedSchedule) -> Path:
    """Write ``tuned`` to ``path`` atomically (the old file or the new one, never half of one)."""
    text = tuned.to_json()
    return atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def load_tuned(path: Path, weights_sha256: str | None, num_timesteps: int) -> TunedSchedule:
    """Read and check a tuned schedule file; ValueError naming the file when it is damaged, for
    another schedule length, or tuned for other weights than ``weights_sha256``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a tuned schedule (not valid JSON: {e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a tuned schedule (format must be {FORMAT!r})")
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported version {data.get('version')!r} (this fastdiff reads {FORMAT_VERSION})")
    fields = ("sampler", "timesteps", "num_timesteps", "weights_sha256", "errors", "settings")
    missing = [name for name in fields if name not in data]
    if missing:
        raise ValueError(f"{path}: damaged tuned schedule, missing {', '.join(missing)}")
    if not isinstance(data["weights_sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", data["weights_sha256"]):
        raise ValueError(f"{path}: damaged tuned schedule, weights_sha256 must be 64 lowercase hex digits")
    if data["num_timesteps"] != num_timesteps:
        raise ValueError(f"{path}: tuned for a schedule of {data['num_timesteps']} timesteps, "
                         f"the model has {num_timesteps}")
    if not isinstance(data["timesteps"], list) or not all(type(t) is int for t in data["timesteps"]):
        raise ValueError(f"{path}: damaged tuned schedule, timesteps must be a list of integers")
    try:
        timesteps = check_timesteps(data["timesteps"], num_timesteps)
    except ValueError as e:
        raise ValueError(f"{path}: damaged tuned schedule, {e}") from None
    if weights_sha256 is None or data["weights_sha256"] != weights_sha256:
        raise ValueError(f"{path}: tuned for other weights (weights_sha256 {data['weights_sha256'][:12]}..., "
                         f"the model's is {weights_sha256 and weights_sha256[:12]}...): run fastdiff tune-steps again")
    return TunedSchedule(data["sampler"], tuple(timesteps.tolist()), num_timesteps, data["weights_sha256"],
                         data["errors"], data["settings"])
