"""The import paths the restructuring moved still work for one release, each with a
DeprecationWarning naming the new home (fastdiff/moved.py)."""
import importlib
import sys

import pytest

from fastdiff import moved


@pytest.fixture(autouse=True)
def fresh_aliases():
    """Each test imports the old paths anew (an import that finds one in sys.modules warns no more)."""
    for old in moved.MOVED:
        sys.modules.pop(old, None)
    yield


@pytest.mark.parametrize("old", sorted(moved.MOVED))
def test_old_path_imports_with_a_warning_and_forwards_names(old):
    with pytest.warns(DeprecationWarning, match=old.replace(".", r"\.") + " moved to"):
        module = importlib.import_module(old)
    home = importlib.import_module(moved.MOVED[old][0])
    public = [name for name in vars(home) if not name.startswith("_")]
    assert public and all(getattr(module, name) is getattr(home, name) for name in public)


def test_the_readme_paths_resolve():
    with pytest.warns(DeprecationWarning):
        from fastdiff.dpmsolver import dpmsolver_table
        from fastdiff.io import atomic_write, load_model  # noqa: F401
        from fastdiff.schedule import StepTable, linear_schedule  # noqa: F401
    from fastdiff.schedulers import dpmsolver_table as new

    assert dpmsolver_table is new


def test_an_unknown_name_is_an_attribute_error():
    with pytest.warns(DeprecationWarning):
        module = importlib.import_module("fastdiff.unet")
    with pytest.raises(AttributeError, match="moved to fastdiff.models.unet"):
        module.no_such_name
