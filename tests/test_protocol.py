"""The evaluation protocol on hand-made embeddings: which gallery each named test uses."""

import numpy as np
import pytest

from bict_ray.retrieval.protocol import Embedded, SequenceEmbeddings, compatibility_matrix, partial_refresh, step_tests


def embedded(seed, n=40, d=8, classes=4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return Embedded(x / np.linalg.norm(x, axis=1, keepdims=True), np.arange(n), np.arange(n) % classes)


def test_named_tests_use_the_right_galleries():
    data = SequenceEmbeddings(queries={1: embedded(1), 2: embedded(2)}, galleries={1: embedded(1), 2: embedded(2)})
    tests = step_tests(data, 2)
    assert set(tests) == {"old_self", "new_self", "backward", "backward_prev", "forward", "deployed_before"}
    assert tests["forward"] == tests["new_self"]  # v2 built equal to phi_2(G) here
    assert tests["deployed_before"] == tests["old_self"]
    assert tests["backward"] == tests["backward_prev"]  # at step 2 the never-upgraded gallery is phi_1(G)


def test_bct_only_keeps_v1_deployed_so_forward_is_backward():
    data = SequenceEmbeddings(queries={1: embedded(1), 2: embedded(2), 3: embedded(3)}, galleries={1: embedded(1)})
    tests = step_tests(data, 3)
    assert tests["forward"] == tests["backward"]
    assert tests["deployed_before"] == step_tests(data, 2)["backward"]  # phi_2 against v1


def test_partial_refresh_ends_at_deployed_and_forward():
    data = SequenceEmbeddings(queries={1: embedded(1), 2: embedded(2)}, galleries={1: embedded(1), 2: embedded(5)})
    curve = partial_refresh(data, 2, [0.0, 0.5, 1.0])
    tests = step_tests(data, 2)
    assert curve[-1]["mAP"] == pytest.approx(tests["forward"]["mAP"])
    assert curve[0]["mAP"] == pytest.approx(tests["backward"]["mAP"])  # phi_2 against v1 untouched
    matrix = compatibility_matrix(data)
    assert matrix["mAP"][1][0] == pytest.approx(tests["backward"]["mAP"])
    assert matrix["queries"] == ["phi_1", "phi_2"] and matrix["galleries"] == ["v1", "v2"]
