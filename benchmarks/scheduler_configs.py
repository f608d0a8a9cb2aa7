"""The configs issue 18 compared: accelerate()'s fused scheduler step against diffusers' own, whole
runs (strength 1.0) and img2img runs (0.8 / 0.5 / 0.3), same model, image and noise; prints a
markdown table of max |fused - diffusers| with max |diffusers| beside it and the steps that ran
fused / by diffusers' own step.

    python benchmarks/scheduler_configs.py
"""
from __future__ import annotations

import warnings

import diffusers

from fastdiff.bench.scheduler_match import compare

STEPS = 10
STRENGTHS = (1.0, 0.8, 0.5, 0.3)
CONFIGS = [
    ("DDPMScheduler", dict(clip_sample=True)),
    ("DDPMScheduler", dict(rescale_betas_zero_snr=True, clip_sample=True, timestep_spacing="trailing")),
    ("DDIMScheduler", dict(clip_sample=False, timestep_spacing="trailing")),
    ("DDIMScheduler", dict(rescale_betas_zero_snr=True, clip_sample=True, timestep_spacing="trailing")),
    *[("DPMSolverMultistepScheduler", dict(solver_order=order, algorithm_type=algorithm))
      for algorithm in ("dpmsolver++", "sde-dpmsolver++") for order in (1, 2, 3)],
    ("DPMSolverMultistepScheduler", dict(solver_order=2, use_karras_sigmas=True)),
    ("DPMSolverMultistepScheduler", dict(solver_order=3, timestep_spacing="trailing", prediction_type="v_prediction")),
    ("DPMSolverMultistepScheduler", dict(solver_order=2, timestep_spacing="trailing", lambda_min_clipped=-5.1,
                                         beta_schedule="squaredcos_cap_v2")),
    ("EulerDiscreteScheduler", dict()),
    ("EulerDiscreteScheduler", dict(prediction_type="v_prediction", timestep_spacing="trailing")),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1)),
    ("EulerDiscreteScheduler", dict(use_exponential_sigmas=True, final_sigmas_type="sigma_min")),
    ("EulerDiscreteScheduler", dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")),
    ("EulerAncestralDiscreteScheduler", dict()),
    ("EulerAncestralDiscreteScheduler", dict(prediction_type="v_prediction", timestep_spacing="leading")),
    ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="trailing", rescale_betas_zero_snr=True)),
]


def main() -> None:
    print(f"{STEPS} steps, batch 2 x 3 x 8 x 8, a smooth stand-in model; cells: max |fused - diffusers| "
          "(max |diffusers|) fused/diffusers' own steps")
    print("| scheduler | config | " + " | ".join(f"strength {s}" for s in STRENGTHS) + " |")
    print("|---|---|" + "---|" * len(STRENGTHS))
    for name, config in CONFIGS:
        cells = []
        for strength in STRENGTHS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = compare(getattr(diffusers, name)(**config), STEPS, strength)
            flag = "" if m.within() else " **over rtol 1e-5 / atol 2e-5**"
            cells.append(f"{m.max_diff:.1e} ({m.max_value:.3g}) {m.fused_calls}/{m.fallback_calls}{flag}")
        options = ", ".join(f"{k}={v}" for k, v in config.items()) or "defaults"
        print(f"| {name} | {options} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
