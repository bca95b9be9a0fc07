"""Tests of log_sinkhorn_assignment and salad_pool against a PyTorch transcription of upstream SALAD.

The reference follows serizba/salad ``models/aggregators/salad.py`` (SuperGlue's log-space Sinkhorn with a
dustbin, then the repeat / multiply / sum aggregation and the three normalizations), rewritten here in
float64 PyTorch; the attention path follows docs/DESIGN.md's SALAD section.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attllm_jax import ops

TOL = 1e-5
B, N, M, L, G = 3, 24, 5, 6, 7  # batch, tokens, clusters, cluster_dim, token_dim (N > M for the dustbin)


def _inputs(key: int = 0, batch: int = B):
    rng = np.random.default_rng(key)
    f = rng.normal(size=(batch, N, L)).astype(np.float32)
    s = (2.0 * rng.normal(size=(batch, M, N))).astype(np.float32)
    g = rng.normal(size=(batch, G)).astype(np.float32)
    att = rng.uniform(0.0, 2.0, size=(batch, N)).astype(np.float32)
    return f, s, g, att


def _torch_log_ot(scores, dustbin: float, iters: int):
    """Upstream's log_optimal_transport (reg 1): log plan times (n + m), dustbin row appended."""
    import torch

    b, m, n = scores.shape
    couplings = torch.cat([scores, torch.full((b, 1, n), dustbin, dtype=scores.dtype)], dim=1)
    norm = -torch.log(torch.tensor(float(m + n), dtype=scores.dtype))
    log_mu = torch.cat([norm.expand(m), torch.log(torch.tensor(float(n - m), dtype=scores.dtype))[None] + norm])
    log_nu = norm.expand(n)
    log_mu, log_nu = log_mu[None].expand(b, -1), log_nu[None].expand(b, -1)
    u, v = torch.zeros_like(log_mu), torch.zeros_like(log_nu)
    for _ in range(iters):
        u = log_mu - torch.logsumexp(couplings + v.unsqueeze(1), dim=2)
        v = log_nu - torch.logsumexp(couplings + u.unsqueeze(2), dim=1)
    return couplings + u.unsqueeze(2) + v.unsqueeze(1) - norm


def _torch_salad(f, s, dustbin, g, att=None, alpha=0.0):
    """Upstream SALAD.forward after the MLPs (f channels-first as upstream: [B, l, N]) in float64."""
    import torch
    import torch.nn.functional as F

    f = torch.from_numpy(np.asarray(f, np.float64)).transpose(1, 2)  # [B, l, N]
    s = torch.from_numpy(np.asarray(s, np.float64))
    t = torch.from_numpy(np.asarray(g, np.float64))
    m = s.shape[1]
    p = torch.exp(_torch_log_ot(s, dustbin, 3))[:, :-1, :]
    if att is not None:
        alpha = torch.as_tensor(np.broadcast_to(np.asarray(alpha, np.float64), (f.shape[0],)).copy())
        a = torch.from_numpy(np.clip(np.asarray(att, np.float64), 0.0, 2.0))
        nu = p.sum(1)
        nu = nu / nu.mean(1, keepdim=True)
        w = nu + alpha[:, None] * (a - nu)
        w = torch.where(alpha[:, None] <= 1e-6, torch.ones_like(w), w)
        f = f * w[:, None, :]
    p = p.unsqueeze(1).repeat(1, f.shape[1], 1, 1)
    f = f.unsqueeze(2).repeat(1, 1, m, 1)
    out = torch.cat([F.normalize(t, p=2, dim=-1), F.normalize((f * p).sum(dim=-1), p=2, dim=1).flatten(1)], dim=-1)
    return F.normalize(out, p=2, dim=-1).numpy()


@pytest.mark.torch
@pytest.mark.parametrize("iters", [0, 1, 3, 10])
def test_log_sinkhorn_matches_upstream(iters):
    torch = pytest.importorskip("torch")
    _, s, _, _ = _inputs(1)
    expected = _torch_log_ot(torch.from_numpy(s.astype(np.float64)), 0.8, iters).numpy()
    out = ops.log_sinkhorn_assignment(s, jnp.float32(0.8), num_iters=iters)
    assert out.shape == (B, M + 1, N)
    np.testing.assert_allclose(out, expected, rtol=TOL, atol=TOL)


@pytest.mark.torch
def test_log_sinkhorn_reg_scales_couplings():
    torch = pytest.importorskip("torch")
    _, s, _, _ = _inputs(2)
    expected = _torch_log_ot(torch.from_numpy(s.astype(np.float64) / 2.5), 1.2 / 2.5, 3).numpy()
    np.testing.assert_allclose(ops.log_sinkhorn_assignment(s, 1.2, reg=2.5), expected, rtol=TOL, atol=TOL)


def test_sinkhorn_marginals_converge():
    """exp(log P + norm) has row sums a = (1,..,1, N - m) / (N + m) and column sums 1 / (N + m) at convergence."""
    _, s, _, _ = _inputs(3)
    row_target = np.append(np.full(M, 1.0), N - M) / (N + M)
    col_target = np.full(N, 1.0 / (N + M))
    errors = []
    for iters in [1, 3, 10, 100]:
        plan = np.exp(np.asarray(ops.log_sinkhorn_assignment(s, 1.0, num_iters=iters), np.float64)) / (N + M)
        np.testing.assert_allclose(plan.sum(axis=1), np.broadcast_to(col_target, (B, N)), rtol=1e-4)  # v is last
        errors.append(np.max(np.abs(plan.sum(axis=2) - row_target)))
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[-1] < 1e-6


@pytest.mark.torch
@pytest.mark.parametrize("dustbin", [1.0, -0.5])
def test_salad_pool_matches_upstream(dustbin):
    f, s, g, _ = _inputs(4)
    out = ops.salad_pool(f, s, jnp.asarray(dustbin), g)
    assert out.shape == (B, G + L * M)
    np.testing.assert_allclose(out, _torch_salad(f, s, dustbin, g), rtol=TOL, atol=TOL)


@pytest.mark.torch
@pytest.mark.parametrize("alpha", [0.0, 1e-6, 0.3, 1.0, [0.0, 0.5, 1.0]])
def test_salad_pool_attention_matches_reference(alpha):
    f, s, g, att = _inputs(5)
    alpha_arr = np.asarray(alpha, np.float32)
    out = ops.salad_pool(f, s, 1.0, g, attention=att, alpha=alpha_arr)
    np.testing.assert_allclose(out, _torch_salad(f, s, 1.0, g, att, alpha), rtol=TOL, atol=TOL)


def test_salad_pool_alpha_off_and_no_attention_are_plain():
    f, s, g, att = _inputs(6)
    plain = ops.salad_pool(f, s, 1.0, g)
    np.testing.assert_allclose(ops.salad_pool(f, s, 1.0, g, attention=att, alpha=1e-6), plain, rtol=TOL, atol=1e-6)
    np.testing.assert_allclose(ops.salad_pool(f, s, 1.0, g, alpha=0.7), plain, rtol=TOL, atol=1e-6)
    assert np.max(np.abs(ops.salad_pool(f, s, 1.0, g, attention=att, alpha=0.5) - plain)) > 1e-3


def test_salad_pool_invariant_to_token_permutation():
    f, s, g, att = _inputs(7)
    perm = np.random.default_rng(8).permutation(N)
    for attention, alpha in [(None, 0.0), (att, 0.6)]:
        permuted_att = None if attention is None else attention[:, perm]
        np.testing.assert_allclose(
            ops.salad_pool(f[:, perm], s[:, :, perm], 1.0, g, permuted_att, alpha),
            ops.salad_pool(f, s, 1.0, g, attention, alpha),
            rtol=TOL,
            atol=1e-6,
        )


def test_salad_pool_batch_of_one_equals_slice():
    f, s, g, att = _inputs(9)
    alpha = np.array([0.0, 0.4, 1.0], np.float32)
    full = ops.salad_pool(f, s, 1.0, g, att, alpha)
    for b in range(B):
        one = ops.salad_pool(f[b : b + 1], s[b : b + 1], 1.0, g[b : b + 1], att[b : b + 1], alpha[b])
        np.testing.assert_allclose(one, full[b : b + 1], rtol=TOL, atol=1e-6)


def test_salad_pool_jit_vmap_over_alpha_and_no_recompilation():
    f, s, g, att = _inputs(10)
    jitted = jax.jit(lambda a, z: ops.salad_pool(f, s, z, g, att, a))
    for alpha in [0.0, 0.5]:
        np.testing.assert_allclose(
            jitted(jnp.float32(alpha), jnp.float32(1.0)), ops.salad_pool(f, s, 1.0, g, att, alpha), rtol=1e-6, atol=1e-6
        )
    assert jitted._cache_size() == 1
    alphas = jnp.linspace(0.0, 1.0, 5)
    swept = jax.jit(jax.vmap(lambda a: ops.salad_pool(f, s, 1.0, g, att, a)))(alphas)
    assert swept.shape == (5, B, G + L * M)
    for k, alpha in enumerate(np.asarray(alphas)):
        np.testing.assert_allclose(swept[k], ops.salad_pool(f, s, 1.0, g, att, float(alpha)), rtol=TOL, atol=1e-6)


@jax.jit
@functools.partial(jax.grad, argnums=(0, 1, 2, 3))
def _salad_grads(alpha, attention, dustbin, scores):
    f, _, g, _ = _inputs(11)
    return jnp.sum(ops.salad_pool(f, scores, dustbin, g, attention, alpha) * jnp.arange(G + L * M))


@pytest.mark.parametrize("alpha", [0.0, 1e-6, 1.0000001e-6, 0.5, 1.0])
def test_salad_pool_gradients_finite(alpha):
    _, s, _, att = _inputs(11)
    grads = _salad_grads(jnp.float32(alpha), jnp.asarray(att), jnp.float32(1.0), s)
    assert all(np.all(np.isfinite(gr)) for gr in grads)
    assert np.any(grads[3] != 0)
    if alpha > 1e-6:
        assert np.any(grads[1] != 0)
    # A map of zeros at alpha = 1 zeroes every local feature: still finite.
    grads = _salad_grads(jnp.float32(alpha), jnp.zeros((B, N)), jnp.float32(1.0), s)
    assert all(np.all(np.isfinite(gr)) for gr in grads)


def test_salad_pool_bfloat16_inputs():
    f, s, g, att = _inputs(12)
    bf = [jnp.asarray(v, jnp.bfloat16) for v in (f, s, g, att)]
    out = ops.salad_pool(bf[0], bf[1], jnp.bfloat16(1.0), bf[2], bf[3], 0.5)
    assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ops.salad_pool(f, s, 1.0, g, att, 0.5), rtol=3e-2, atol=3e-2)
    log_p = ops.log_sinkhorn_assignment(bf[1], 1.0)
    assert log_p.dtype == jnp.float32
    np.testing.assert_allclose(log_p, ops.log_sinkhorn_assignment(s, 1.0), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize(
    "change, name",
    [
        ({"f": np.zeros((B, N), np.float32)}, "local_features"),
        ({"s": np.zeros((B, M, N + 1), np.float32)}, "scores"),
        ({"s": np.zeros((B + 1, M, N), np.float32)}, "scores"),
        ({"g": np.zeros((B + 1, G), np.float32)}, "global_token"),
        ({"att": np.zeros((B, N - 1), np.float32)}, "attention"),
        ({"att": np.zeros((B, 4, 6), np.float32)}, "attention"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.5}, "alpha"),
        ({"alpha": np.array([0.5, 0.5])}, "alpha"),
        ({"dustbin": np.ones(2)}, "dustbin"),
    ],
)
def test_salad_pool_bad_inputs_raise(change, name):
    f, s, g, att = _inputs(13)
    args = {"f": f, "s": s, "g": g, "att": att, "alpha": 0.5, "dustbin": 1.0} | change
    with pytest.raises(ValueError, match=name):
        ops.salad_pool(args["f"], args["s"], args["dustbin"], args["g"], args["att"], args["alpha"])


def test_log_sinkhorn_bad_inputs_raise():
    with pytest.raises(ValueError, match="scores"):
        ops.log_sinkhorn_assignment(np.zeros((1, 8, 8), np.float32), 1.0)
    with pytest.raises(ValueError, match="scores"):
        ops.log_sinkhorn_assignment(np.zeros((8, 9), np.float32), 1.0)
    with pytest.raises(ValueError, match="num_iters"):
        ops.log_sinkhorn_assignment(np.zeros((1, 2, 8), np.float32), 1.0, num_iters=-1)
