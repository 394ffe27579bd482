"""The boundaries between the packages (docs/architecture.md), checked in fresh interpreters so that no
other test's imports count."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(imports: str) -> set[str]:
    code = f"import sys\n{imports}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return set(out.split())


def _modules_of(package: str) -> list[str]:
    path = ROOT.joinpath(*package.split("."))
    return [m.name for m in pkgutil.walk_packages([str(path)], f"{package}.")]


def test_stage_two_never_loads_stage_one_or_the_scheduler() -> None:
    """Training reads the cache; the encoder runtime, the episode readers and dask stay out of its process
    (`online.py` is the exception by design: the baseline runs stage one's code in the step)."""
    modules = [m for m in _modules_of("stages.train") if m != "stages.train.online"]
    loaded = _modules_after("\n".join(f"import {m}" for m in modules))
    assert not {m for m in loaded if m.startswith("stages.extract") or m in ("distributed", "dask", "decord")}


def test_the_caches_commands_never_load_the_encoder_runtime() -> None:
    loaded = _modules_after("\n".join(f"import {m}" for m in _modules_of("stages.cache")))
    assert not {"stages.extract.encoder", "stages.extract.part", "stages.extract.driver", "distributed"} & loaded


def test_the_store_imports_no_stage_and_no_manifest() -> None:
    loaded = _modules_after("\n".join(f"import {m}" for m in _modules_of("pipeline.store")))
    assert not {m for m in loaded if m.startswith("stages")} and "pipeline.manifest" not in loaded


def test_the_store_settings_load_without_zarr_or_torch() -> None:
    loaded = _modules_after("import pipeline.store.settings, pipeline.manifest")
    assert not {"zarr", "torch", "pipeline.store.store"} & loaded


@pytest.mark.parametrize("module", ["vit", "rope", "predictor", "release_weights"])
def test_models_are_leaves(module: str) -> None:
    loaded = _modules_after(f"import stages.models.{module}")
    assert not {m for m in loaded if m == "pipeline" or m.startswith("pipeline.")}
    leaves = {"stages.models", *(f"stages.models.{n}" for n in ("vit", "rope", "predictor", "release_weights"))}
    assert {m for m in loaded if m.startswith("stages.")} <= leaves


def test_help_does_not_import_the_stages() -> None:
    loaded = _modules_after("import pipeline.cli")
    assert not {m for m in loaded if m.startswith("stages.") and m != "stages"}
    assert "torch" not in loaded


def test_pipeline_imports_a_stage_only_inside_a_command() -> None:
    """`stages` imports `pipeline`, never the reverse, but for the CLI's commands, each importing its stage
    when it runs (so that `pipeline --help` stays fast)."""
    for path in (ROOT / "pipeline").rglob("*.py"):
        for line in path.read_text().splitlines():
            if line.startswith(("from stages", "import stages")):
                pytest.fail(f"{path.relative_to(ROOT)} imports a stage at module level: {line}")
