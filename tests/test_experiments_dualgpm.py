"""DualGPM: projected gradients are orthogonal to the stored basis; the basis grows and stays orthonormal."""

import pytest
import torch

from mira.experiments.dualgpm import GradientProjectionMemory, ProjectedParameter


def _low_rank(n, d, k, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=dtype) @ torch.randn(k, d, generator=g, dtype=dtype)


def _assert_orthonormal(u):
    eye = torch.eye(u.shape[1], dtype=u.dtype)
    torch.testing.assert_close(u.T @ u, eye, atol=1e-10, rtol=0)


def test_projected_gradient_is_orthogonal_to_basis():
    gpm = GradientProjectionMemory(threshold=0.9)
    gpm.update("w", _low_rank(40, 16, 3, seed=0))
    basis = gpm.basis("w")
    assert 1 <= basis.shape[1] <= 3
    grad = torch.randn(7, 16, dtype=torch.float64)
    before = grad.clone()
    gpm.project_("w", grad)
    assert (grad @ basis).abs().max() < 1e-10
    # only the protected component was removed: the rest is untouched
    torch.testing.assert_close(grad, before - before @ basis @ basis.T)


def test_basis_grows_and_stays_orthonormal_across_tasks_and_dual_switch():
    d = 12
    gpm = GradientProjectionMemory(threshold=0.99)
    ranks = []
    for task in range(5):
        gpm.update("keys", _low_rank(30, d, 2, seed=10 + task))
        ranks.append(gpm.rank("keys"))
        _assert_orthonormal(gpm.basis("keys"))
    assert ranks == sorted(ranks) and ranks[-1] > ranks[0]
    # with 10 directions in R^12 the memory switched to storing the 2-d complement
    assert ranks[-1] > d // 2 and gpm.is_dual("keys")
    grad = torch.randn(5, d, dtype=torch.float64)
    gpm.project_("keys", grad)
    assert (grad @ gpm.basis("keys")).abs().max() < 1e-10


def test_threshold_controls_captured_energy():
    acts = torch.randn(200, 20, dtype=torch.float64) * torch.logspace(0, -2, 20, dtype=torch.float64)
    for thr in (0.5, 0.7, 0.95):
        gpm = GradientProjectionMemory(threshold=thr)
        gpm.update("h", acts)
        u = gpm.basis("h")
        captured = (acts @ u).square().sum() / acts.square().sum()
        assert captured >= thr - 1e-12
        # minimal: one direction fewer would not reach the threshold
        assert (acts @ u[:, :-1]).square().sum() / acts.square().sum() < thr


def test_already_captured_activations_add_nothing():
    gpm = GradientProjectionMemory(threshold=0.7)
    acts = _low_rank(50, 10, 2, seed=3)
    gpm.update("q", acts)
    r = gpm.rank("q")
    assert gpm.update("q", acts) == 0 and gpm.rank("q") == r


def test_switch_off_disables_projection():
    gpm = GradientProjectionMemory(enabled=False)
    gpm.update("w", torch.randn(10, 4))
    grad = torch.randn(3, 4)
    before = grad.clone()
    gpm.project_("w", grad)
    assert "w" not in gpm and torch.equal(grad, before)


def test_projected_linear_keeps_old_outputs():
    """A linear layer (with bias) trained under projection keeps its outputs on past inputs."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 3)
    old_x = _low_rank(64, 8, 2, seed=5).float()
    gpm = GradientProjectionMemory(threshold=0.999)
    pp = ProjectedParameter("lin", lin.weight, lin.bias)
    gpm.update("lin", pp.augment(old_x))
    old_out = lin(old_x).detach()
    w0 = lin.weight.detach().clone()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    new_x, target = torch.randn(64, 8), torch.randn(64, 3)
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.mse_loss(lin(new_x), target).backward()
        pp.project(gpm)
        opt.step()
    assert (lin(old_x) - old_out).abs().max() < 1e-3 * old_out.abs().max()
    assert (lin.weight.detach() - w0).abs().max() > 1e-2  # it did learn, only elsewhere
    with pytest.raises(ValueError):
        gpm.update("lin", torch.randn(4, 5))


def test_threshold_one_protects_the_data_not_its_rounding_and_reports_what_it_added():
    # The cutoff was relative to the residual's own largest singular value: once the basis held a
    # batch, its float32 copy's rounding residue counted as 13 new directions (rank 16 of 16, the
    # parameter frozen), and update returned 16 where the rank grew by 13.
    d = 16
    acts = _low_rank(40, d, 3, seed=0, dtype=torch.float64)
    gpm = GradientProjectionMemory(threshold=1.0)
    ranks = [0]
    for batch in (acts, acts, acts.float()):
        added = gpm.update("a", batch)
        ranks.append(gpm.rank("a"))
        assert added == ranks[-1] - ranks[-2]
    assert ranks == [0, 3, 3, 3]
    # as gpm_update gives them: float32 activations of rank 3, protected at threshold 1.0
    gpm = GradientProjectionMemory(threshold=1.0)
    assert gpm.update("b", _low_rank(40, d, 3, seed=1)) == 3 and gpm.rank("b") == 3
    _assert_orthonormal(gpm.basis("b"))


@pytest.mark.parametrize("dual", [False, True], ids=["primal", "dual"])
def test_projection_is_in_place_for_a_non_contiguous_gradient(dual):
    # reshape(-1, d) copied a non-contiguous (..., d) gradient: the copy was projected, grad was not.
    d = 6
    gpm = GradientProjectionMemory(threshold=1.0)
    gpm.update("b", _low_rank(20, d, 5 if dual else 2, seed=2, dtype=torch.float64))
    assert gpm.is_dual("b") == dual
    basis = gpm.basis("b").float()
    for grad in (torch.randn(d, 3, 2).permute(2, 1, 0), torch.randn(d, 4).T):
        assert not grad.is_contiguous()
        expected = grad - grad @ basis @ basis.T
        assert gpm.project_("b", grad) is grad
        assert (grad @ basis).abs().max() < 1e-5
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e200], ids=["inf", "nan", "overflow"])
def test_non_finite_activations_are_refused_and_change_nothing(bad):
    # An inf read as "nothing to add" (0), a NaN raised LAPACK's error, values whose energy
    # overflows float64 added nothing silently; each left an empty basis registered under the name.
    gpm = GradientProjectionMemory(threshold=0.9)
    x = torch.randn(5, 4, dtype=torch.float64)
    x[0, 0] = bad
    with pytest.raises(ValueError, match="w: "):
        gpm.update("w", x)
    assert "w" not in gpm and gpm.state_dict()["bases"] == {}
    # and an existing basis is left as it was
    gpm.update("w", _low_rank(20, 4, 1, seed=0))
    before = gpm.basis("w").clone()
    with pytest.raises(ValueError, match="w: "):
        gpm.update("w", x)
    assert torch.equal(gpm.basis("w"), before)


def test_empty_batch_adds_nothing_and_registers_no_basis():
    # An empty (0, 4) batch registered a dim-4 basis, so a later (3, 5) batch was refused.
    gpm = GradientProjectionMemory()
    assert gpm.update("h", torch.zeros(0, 4)) == 0
    assert "h" not in gpm and gpm.rank("h") == 0
    assert gpm.update("h", _low_rank(3, 5, 1, seed=0)) == 1 and gpm.basis("h").shape == (5, 1)
    # against an existing basis an empty batch is still checked for its dimension
    with pytest.raises(ValueError, match="dim 4, basis has 5"):
        gpm.update("h", torch.zeros(0, 4))
    assert gpm.update("h", torch.zeros(0, 5)) == 0 and gpm.rank("h") == 1


@pytest.mark.parametrize("threshold", ["0.7", None, True, torch.tensor(0.7)])
def test_threshold_of_the_wrong_type_is_refused(threshold):
    with pytest.raises(TypeError, match="threshold must be a real number"):
        GradientProjectionMemory(threshold=threshold)


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.5, float("nan")])
def test_threshold_out_of_range_is_refused(threshold):
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        GradientProjectionMemory(threshold=threshold)


def test_threshold_accepts_any_real_number_in_range():
    np = pytest.importorskip("numpy")
    for threshold in (1, 0.7, np.float64(0.7)):
        assert GradientProjectionMemory(threshold=threshold).threshold == threshold
