"""GradientFlowError and Problem: what a check raises survives the ways errors travel (pickling, copying)."""

import copy
import pickle

from composites import GradientFlowError, Problem


def test_gradient_flow_error_survives_pickle_and_copy():
    error = GradientFlowError([Problem("encoder.weight", "encoder", "detached", "after 'encoder'")])
    for back in (pickle.loads(pickle.dumps(error)), copy.copy(error), copy.deepcopy(error)):
        assert type(back) is GradientFlowError
        assert back.problems == error.problems and str(back) == str(error)
