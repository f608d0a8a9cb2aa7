"""Names the command line and the library share: model presets, sampler names, dtype names.
Torch-free, so that ``fastdiff COMMAND --help`` needs no torch import."""
from __future__ import annotations

#: Random-init model presets (:func:`fastdiff.models.unet.preset_config`), --config of the commands.
PRESETS = ("default", "cifar10", "tiny")
#: --sampler name -> (fastdiff.schedulers method, multistep order or None).
SAMPLER_METHODS = {
    "ddpm": ("ddpm", None),
    "ddim": ("ddim", None),
    "dpm++2m": ("dpmsolver++", 2),
    "dpm++3m": ("dpmsolver++", 3),
    "dpm++2m-sde": ("sde-dpmsolver++", 2),
    "dpm++3m-sde": ("sde-dpmsolver++", 3),
    "euler": ("euler", None),
    "euler-a": ("euler-ancestral", None),
    "unipc": ("unipc", 2),  # bh2, order 2: diffusers' UniPCMultistepScheduler defaults
}
SAMPLERS = tuple(SAMPLER_METHODS)
#: Samplers without noise (DDPM and the SDE solvers add some): the ones whose error to the
#: probability-flow ODE is defined and whose timesteps ``fastdiff tune-steps`` tunes.
DETERMINISTIC_SAMPLERS = tuple(name for name, (method, _) in SAMPLER_METHODS.items()
                               if method not in ("ddpm", "euler-ancestral") and not method.startswith("sde-"))
#: Which timesteps a sampler runs (Sampler ``timesteps=``, ``fastdiff sample --schedule``): the model
#: folder's tuned schedule for that sampler and step count when it has one ("auto"), always the
#: default spacing, or the tuned one (an error when there is none).
TIMESTEP_CHOICES = ("auto", "default", "tuned")
#: Model dtypes by name (``getattr(torch, name)``), --dtype of the commands.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
#: Default --steps: DDIM 50, DPM-Solver++ and UniPC 20, Euler 30 (diffusers' usual settings); DDPM runs all T.
DEFAULT_STEPS = {"ddim": 50, "dpmsolver++": 20, "sde-dpmsolver++": 20, "euler": 30, "euler-ancestral": 30, "unipc": 20}


def sampler_kwargs(name: str) -> dict:
    """--sampler name -> keyword arguments of fastdiff.schedulers.step_table / fastdiff.Sampler."""
    method, order = SAMPLER_METHODS[name]
    return {"method": method} if order is None else {"method": method, "order": order}


def sampler_name(method: str, order: int | None = None) -> str | None:
    """The --sampler name of a fastdiff.schedulers method (and DPM-Solver++ order); None if none."""
    for name, (named_method, named_order) in SAMPLER_METHODS.items():
        if named_method == method and (named_order is None or named_order == order):
            return name
    return None


def default_steps(name: str, num_timesteps: int) -> int:
    return DEFAULT_STEPS.get(SAMPLER_METHODS[name][0], num_timesteps)
