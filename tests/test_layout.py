"""The import rules of DESIGN section 4, checked in fresh interpreters so no other test's imports count."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _modules_after(imports: str) -> set[str]:
    code = f"import sys\n{imports}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_stage_two_never_loads_the_encoder_runtime() -> None:
    loaded = _modules_after("import stages.train, stages.status, stages.windows, stages.gc, stages.evaluate")
    assert not {"stages.encoder", "stages.part", "stages.extract", "distributed"} & loaded


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
