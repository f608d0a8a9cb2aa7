"""The README's scheduler table stays true: it names every scheduler class diffusers ships, and
each one that builds offline with its defaults is fused or left alone by accelerate() as the row says."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
from helpers import tiny_diffusers_unet

from fastdiff import accelerate

diffusers = pytest.importorskip("diffusers")

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "### Schedulers: fused or left to diffusers"


def readme_rows() -> dict[str, str]:
    """scheduler class -> "fused" or "left to diffusers", from the README table."""
    text = README.read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n### ", len(SECTION))]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1] in ("fused", "left to diffusers"):
            for name in cells[0].split(","):
                rows[name.strip()] = cells[1]
    return rows


def test_table_names_every_scheduler_diffusers_ships():
    shipped = {name for name in dir(diffusers) if name.endswith("Scheduler")}
    assert set(readme_rows()) == shipped


@pytest.fixture(scope="module")
def unet():
    return tiny_diffusers_unet().eval()


@pytest.mark.parametrize("name, status", sorted(readme_rows().items()))
def test_accelerate_does_what_the_row_says(unet, name, status):
    """A DDPMPipeline holding the scheduler: the scheduler step is fused, or left alone and said so."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler = getattr(diffusers, name)()
    except (TypeError, ImportError) as error:  # required arguments, or an optional package (torchsde)
        pytest.skip(f"{name} does not build offline with its defaults: {error}")
    report = accelerate(diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)).fastdiff_report
    if status == "fused":
        assert report.counts["scheduler_step"] == 1 and not report.left_alone, report
    else:
        assert report.counts["scheduler_step"] == 0, report
        assert re.search(f"left alone: scheduler: {name} is not one of", str(report)), report
