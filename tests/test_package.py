"""The package itself: importable without Hydra (and without paying for Lightning), public names."""

import subprocess
import sys

import composites

DESIGN_NAMES = ["Sequential", "Parallel", "Conditional", "GradientGuard", "GradientFlowError", "CompositeModule"]


def test_import_composites_loads_neither_hydra_nor_lightning():
    code = (
        "import sys, composites\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'hydra', 'omegaconf', 'pytorch_lightning', 'matplotlib'})\n"
        "print(','.join(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


def test_the_public_names_of_the_design_are_exported():
    assert all(hasattr(composites, name) for name in DESIGN_NAMES)
    assert set(DESIGN_NAMES) <= set(composites.__all__)
    assert issubclass(composites.GradientFlowError, RuntimeError)
