"""clip_threshold and coord_clip against a NumPy sort, and inside optax's machinery."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optclip
from tests import oracles


def _leaves_of(tree):
  return [l for l in jax.tree.leaves(tree)]


def _random_tree(rng, dtype=np.float32):
  """A few leaves of varied shapes and distributions, some all-zero or with ties."""
  leaves = {}
  for i in range(int(rng.integers(1, 6))):
    shape = tuple(int(s) for s in rng.integers(1, 40, size=rng.integers(0, 3)))
    kind = int(rng.integers(0, 5))
    if kind == 0:
      x = rng.standard_t(1.5, size=shape)  # heavy tails
    elif kind == 1:
      x = rng.integers(-3, 4, size=shape).astype(float)  # many ties
    elif kind == 2:
      x = np.zeros(shape)
    elif kind == 3:
      x = rng.standard_normal(shape) * 10.0 ** float(rng.integers(-30, 30))
    else:
      x = rng.standard_normal(shape)
    leaves[f"leaf{i}"] = jnp.asarray(np.asarray(x, np.float32)).astype(dtype)
  return leaves


class ThresholdTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_random_trees_match_numpy_sort(self):
    rng = np.random.default_rng(0)
    threshold = self.variant(optclip.clip_threshold, static_argnums=1)
    for _ in range(8):
      tree = _random_tree(rng)
      fraction = float(rng.choice([0.001, 0.01, 0.1, 0.33, 0.5, 0.7, 1.0]))
      got = threshold(tree, fraction)
      want = oracles.threshold(_leaves_of(tree), fraction)
      np.testing.assert_array_equal(np.float64(got), want)

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16_bit_exact(self):
    rng = np.random.default_rng(1)
    threshold = self.variant(optclip.clip_threshold, static_argnums=1)
    for _ in range(4):
      tree = _random_tree(rng, dtype=jnp.bfloat16)
      got = threshold(tree, 0.1)
      self.assertEqual(got.dtype, jnp.bfloat16)
      want = oracles.threshold(_leaves_of(tree), 0.1)
      np.testing.assert_array_equal(np.float64(got.astype(jnp.float32)), want)

  def test_many_coordinates_take_the_fast_paths(self):
    # Large enough for the sample, interpolation and the extremes rules to all take part.
    rng = np.random.default_rng(2)
    tree = [jnp.asarray(rng.standard_t(2, size=(300, 200)).astype(np.float32))
            for _ in range(8)]
    tree.append(jnp.zeros((1000,), jnp.float32))
    threshold = jax.jit(optclip.clip_threshold, static_argnums=1)
    for fraction in [1e-5, 0.01, 0.1, 0.5, 0.9, 1.0]:
      np.testing.assert_array_equal(
          np.float64(threshold(tree, fraction)),
          oracles.threshold(_leaves_of(tree), fraction))

  def test_ties_at_the_threshold(self):
    tree = {"a": jnp.array([5., 3., 3., 3., 1.]), "b": jnp.array([-3., 0.])}
    # k = ceil(0.3 * 7) = 3: the sorted |g| are 5, 3, 3, 3, 3, 1, 0.
    self.assertEqual(float(optclip.clip_threshold(tree, 0.3)), 3.0)
    self.assertEqual(float(optclip.clip_threshold(tree, 1 / 7)), 5.0)

  def test_single_coordinate_and_all_zero(self):
    self.assertEqual(float(optclip.clip_threshold(jnp.array([-2.5]), 0.5)), 2.5)
    self.assertEqual(float(optclip.clip_threshold([jnp.zeros((3, 4))], 0.1)), 0.0)

  def test_fraction_one_is_smallest_magnitude(self):
    tree = [jnp.array([4., -0.25, 2.]), jnp.array([[-8., 1.]])]
    self.assertEqual(float(optclip.clip_threshold(tree, 1.0)), 0.25)

  def test_subnormal_threshold(self):
    tiny = np.float32(1e-40)
    tree = [jnp.asarray(np.array([tiny, 2 * tiny, 0, 0, 1.0], np.float32))]
    got = optclip.clip_threshold(tree, 0.6)  # k = 3: 1.0, 2e-40, 1e-40
    np.testing.assert_array_equal(np.asarray(got), tiny)

  def test_nan_and_inf_are_excluded(self):
    tree = {"a": jnp.array([jnp.nan, 1., 2., jnp.inf]), "b": jnp.array([-jnp.inf, 3., 4.])}
    # finite: 1, 2, 3, 4 -> k = ceil(0.5 * 4) = 2 -> 3.
    self.assertEqual(float(optclip.clip_threshold(tree, 0.5)), 3.0)
    self.assertEqual(float(jax.jit(optclip.clip_threshold, static_argnums=1)(tree, 0.5)), 3.0)
    all_nan = [jnp.full((3,), jnp.nan)]
    self.assertEqual(float(optclip.clip_threshold(all_nan, 0.5)), np.inf)

  def test_k_is_numpys_float64_ceiling_when_non_finite_entries_are_counted(self):
    # With NaN/Inf present n_finite is counted on device; k must still be numpy's
    # ceil(fraction * n) in float64: 0.3 * 10 = 3.0 (a float32 0.3 would give 4) and
    # 0.1 * 30 = 3.0000000000000004 (so 4).
    rng = np.random.default_rng(9)
    threshold = jax.jit(optclip.clip_threshold, static_argnums=1)
    for finite, fraction in [(10, 0.3), (30, 0.1), (10, 0.1), (7, 1 / 7), (1000, 0.7)]:
      values = rng.permutation(np.arange(1, finite + 1)).astype(np.float32)
      tree = [jnp.asarray(np.concatenate([values, [np.nan, np.inf]]).astype(np.float32))]
      np.testing.assert_array_equal(np.float64(threshold(tree, fraction)),
                                    oracles.threshold(tree, fraction))

  def test_top_count_on_device_matches_numpy(self):
    """k = numpy's float64 ceil(fraction * n) for counts up to 2^31 - 2, for Python floats
    and for traced fractions (read as float32), subnormal fractions included."""
    from optclip import _selection
    rng = np.random.default_rng(10)
    n = np.concatenate([np.arange(0, 3000), rng.integers(0, 2 ** 31 - 1, 3000),
                        [2 ** 31 - 2, 2 ** 24 + 1]]).astype(np.int64)
    device_n = jnp.asarray(n, jnp.int32)
    static = jax.jit(_selection.top_count, static_argnums=0)
    traced = jax.jit(_selection.top_count)
    for fraction in [0.1, 0.3, 1 / 3, 0.7, 1e-5, 1.0, 5e-324, 1e-40] + list(rng.random(5)):
      want = np.where(n > 0, np.clip(np.ceil(np.float64(fraction) * n), 1, n), 0)
      np.testing.assert_array_equal(np.asarray(static(float(fraction), device_n)), want)
      as_float32 = np.float64(np.float32(fraction))
      want = np.where(n > 0, np.clip(np.ceil(as_float32 * n), 1, n), 0)
      np.testing.assert_array_equal(np.asarray(traced(jnp.float32(fraction), device_n)), want)

  def test_per_leaf(self):
    rng = np.random.default_rng(3)
    tree = {"w": jnp.asarray(rng.standard_normal((20, 7)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((5,)), jnp.float32),
            "step": jnp.array(3), "none": None}
    got = jax.jit(lambda t: optclip.clip_threshold(t, 0.2, per_leaf=True))(tree)
    self.assertIsNone(got["step"])
    self.assertIsNone(got["none"])
    for name in ("w", "b"):
      np.testing.assert_array_equal(np.float64(got[name]),
                                    oracles.threshold([tree[name]], 0.2))

  def test_ignores_non_float_leaves_and_empty_trees(self):
    tree = {"ints": jnp.array([100, 200]), "bools": jnp.array([True]), "x": jnp.array([1., 2.])}
    self.assertEqual(float(optclip.clip_threshold(tree, 0.5)), 2.0)
    self.assertEqual(float(optclip.clip_threshold({}, 0.5)), np.inf)

  def test_traced_fraction(self):
    rng = np.random.default_rng(4)
    tree = [jnp.asarray(rng.standard_normal((1000,)), jnp.float32)]
    f = jax.jit(optclip.clip_threshold)
    for fraction in [0.013, 0.25, 0.5]:
      np.testing.assert_array_equal(
          np.float64(f(tree, jnp.float32(fraction))),
          oracles.threshold(tree, np.float32(fraction)))

  @pytest.mark.filterwarnings("ignore")
  def test_bad_fraction_raises_naming_argument(self):
    for bad in [0.0, -0.1, 1.5, float("nan"), "0.1", None, True]:
      with self.assertRaisesRegex(ValueError, "fraction"):
        optclip.clip_threshold([jnp.ones(3)], bad)
      with self.assertRaisesRegex(ValueError, "fraction"):
        optclip.coord_clip(bad)


def _unpacked_threshold(tree, fraction, *, sample=True):
  """The search on the leaves as given: one reduce per leaf, as on the large leaves of trees
  over 2^18 coordinates (which `clip_threshold` does not concatenate); ``sample=False`` seeds
  the first pivots from the mean |g|, as for sharded leaves."""
  from optclip import _selection
  leaves = [l for l in jax.tree.leaves(tree)]
  fmt = _selection.key_format([l.dtype for l in leaves])
  keys, _, _ = jax.jit(lambda l: _selection.kth_largest_keys(l, fraction, sample=sample,
                                                             pack_below=0))(leaves)
  return np.float64(_selection.key_to_value(keys, fmt)[0])


class HardDistributionsTest(chex.TestCase):
  """Trees that defeat the search's interpolation: clusters of near-ties, scales 10^±20,
  large tie masses beside subnormals, NaN/Inf among many coordinates."""

  @pytest.mark.slow  # long on 2 cores (25-50 s): outside the default suite's budget
  def test_against_numpy_sort(self):
    rng = np.random.default_rng(8)
    threshold = jax.jit(lambda t, f, p: optclip.clip_threshold(t, f, per_leaf=p),
                        static_argnums=(1, 2))
    clustered = [jnp.asarray((1 + rng.integers(0, 5, size=(300, 50)) * 1e-6).astype(np.float32))
                 for _ in range(3)]
    scales = [jnp.asarray((rng.standard_normal((200, 100)) * 10.0 ** e).astype(np.float32))
              for e in (-20, -3, 5, 20)]
    tied = rng.standard_t(1.2, size=(300, 300)).astype(np.float32)
    tied[rng.random(tied.shape) < 0.3] = 0.5
    subnormal = (rng.standard_normal(777) * 1e-38).astype(np.float32)
    with_nan = rng.standard_t(2, size=(400, 100)).astype(np.float32)
    with_nan[rng.random(with_nan.shape) < 0.01] = np.nan
    with_nan[0, :4] = [np.inf, -np.inf, np.nan, -0.0]
    trees = [clustered, scales, [jnp.asarray(tied), jnp.asarray(subnormal)],
             [jnp.asarray(with_nan), jnp.asarray(rng.standard_normal(5000), jnp.float32)]]
    for tree in trees:  # each (fraction, per_leaf) compiles anew: a few of each
      for fraction in (1e-4, 0.01, 0.5, 1.0):
        np.testing.assert_array_equal(np.float64(threshold(tree, fraction, False)),
                                      oracles.threshold(tree, fraction))
        np.testing.assert_array_equal(_unpacked_threshold(tree, fraction),
                                      oracles.threshold(tree, fraction))
      for fraction in (0.1, 0.9):
        for got, leaf in zip(threshold(tree, fraction, True), tree):
          np.testing.assert_array_equal(np.float64(got), oracles.threshold([leaf], fraction))


class CoordClipTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_clips_to_threshold_and_is_idempotent(self):
    rng = np.random.default_rng(5)
    tx = optclip.coord_clip(0.1)
    update = self.variant(tx.update)
    for _ in range(5):
      tree = _random_tree(rng)
      clipped, state = update(tree, tx.init(tree))
      tau = oracles.threshold(_leaves_of(tree), 0.1)
      self.assertEqual(float(state.threshold), tau)
      for name, leaf in tree.items():
        x = np.asarray(leaf, np.float64)
        want = np.sign(x) * np.minimum(np.abs(x), tau)
        np.testing.assert_array_equal(np.asarray(clipped[name], np.float64), want)
        self.assertTrue(np.all(np.abs(np.asarray(clipped[name])) <= tau))
      twice, _ = update(clipped, state)
      chex.assert_trees_all_equal(twice, clipped)

  def test_passes_ints_none_nan_inf_and_keeps_dtypes(self):
    tree = {"i": jnp.array([7, -9]), "n": None,
            "f": jnp.array([jnp.nan, jnp.inf, -5., 1., 2.]),
            "h": jnp.array([3., -4.], jnp.bfloat16)}
    tx = optclip.coord_clip(0.5)
    out, _ = jax.jit(tx.update)(tree, tx.init(tree))
    chex.assert_trees_all_equal(out["i"], tree["i"])
    self.assertIsNone(out["n"])
    self.assertEqual(out["h"].dtype, jnp.bfloat16)
    # finite |g|: 5, 1, 2, 3, 4 -> k = 3 -> tau = 3.
    np.testing.assert_array_equal(np.asarray(out["f"]), [np.nan, np.inf, -3., 1., 2.])
    np.testing.assert_array_equal(np.asarray(out["h"], np.float32), [3., -3.])

  def test_empty_tree(self):
    tx = optclip.coord_clip(0.5)
    out, _ = tx.update({}, tx.init({}))
    self.assertEqual(out, {})

  def test_per_leaf_thresholds(self):
    tree = {"a": jnp.array([1., 2., 3., 4.]), "b": jnp.array([10., 20.])}
    tx = optclip.coord_clip(0.5, per_leaf=True)
    out, state = tx.update(tree, tx.init(tree))
    np.testing.assert_array_equal(out["a"], [1., 2., 3., 3.])
    np.testing.assert_array_equal(out["b"], [10., 20.])
    self.assertEqual(float(state.threshold["a"]), 3.0)

  def test_inject_hyperparams_changes_fraction_without_recompiling(self):
    rng = np.random.default_rng(6)
    params = {"w": jnp.asarray(rng.standard_normal((50, 4)), jnp.float32)}
    grads = {"w": jnp.asarray(rng.standard_normal((50, 4)), jnp.float32)}
    tx = optax.inject_hyperparams(optclip.coord_clip)(fraction=0.1)
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(grads, state):
      traces.append(1)
      return tx.update(grads, state, params)

    for fraction in [0.1, 0.5, 0.9]:
      state.hyperparams["fraction"] = jnp.asarray(fraction)
      out, state = step(grads, state)
      tau = oracles.threshold([grads["w"]], np.float32(fraction))
      np.testing.assert_array_equal(np.max(np.abs(np.asarray(out["w"]))), tau)
    self.assertLen(traces, 1)

  def test_masked(self):
    tree = {"a": jnp.array([1., 2., 3., 4.]), "b": jnp.array([100., 200.])}
    tx = optax.masked(optclip.coord_clip(0.5), {"a": True, "b": False})
    out, _ = jax.jit(tx.update)(tree, tx.init(tree))
    np.testing.assert_array_equal(out["a"], [1., 2., 3., 3.])
    np.testing.assert_array_equal(out["b"], [100., 200.])

  def test_multi_steps_clips_the_accumulated_gradient_once(self):
    params = jnp.zeros(4)
    tx = optax.MultiSteps(optax.chain(optclip.coord_clip(0.5), optax.sgd(1.0)),
                          every_k_schedule=2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    out, state = update(jnp.array([4., 0., 2., 1.]), state, params)
    np.testing.assert_array_equal(out, np.zeros(4))
    out, state = update(jnp.array([4., 6., 2., 1.]), state, params)
    # mean gradient (4, 3, 2, 1), k = 2 -> tau = 3.
    np.testing.assert_array_equal(out, [-3., -3., -2., -1.])

  def test_apply_if_finite_skips_nan_steps(self):
    params = jnp.ones(3)
    tx = optax.apply_if_finite(optax.chain(optclip.coord_clip(0.5), optax.sgd(1.0)), 3)
    state = tx.init(params)
    out, state = jax.jit(tx.update)(jnp.array([1., jnp.nan, 2.]), state, params)
    np.testing.assert_array_equal(out, np.zeros(3))
    self.assertEqual(int(state.notfinite_count), 1)
    out, state = jax.jit(tx.update)(jnp.array([1., 3., 2.]), state, params)
    np.testing.assert_array_equal(out, [-1., -2., -2.])

  def test_documented_chain_example(self):
    tx = optax.chain(optclip.coord_clip(0.1), optax.sgd(1e-2))
    grads = jnp.arange(1.0, 21.0)
    out, _ = tx.update(grads, tx.init(grads))
    # k = ceil(0.1 * 20) = 2 -> tau = 19.
    np.testing.assert_allclose(out, -1e-2 * np.minimum(np.arange(1.0, 21.0), 19.0))


@pytest.mark.slow  # long on 2 cores (25-50 s): outside the default suite's budget
def test_gather_free_path_matches_numpy():
  """The selection used for sharded leaves (first pivots from the mean, no sample) is exact
  too."""
  rng = np.random.default_rng(7)
  trees = [_random_tree(rng) for _ in range(4)]
  trees.append([jnp.asarray(rng.standard_t(2, size=(200, 300)).astype(np.float32))])
  tiny = np.float32(1e-40)
  trees.append([jnp.asarray(np.array([tiny, 3 * tiny, 2 * tiny, 0, 0, 1.0], np.float32))])
  # Non-finite entries must not pose as zeros when the answer is the smallest finite |g|.
  with_nan = rng.standard_t(2, size=(40, 30)).astype(np.float32)
  with_nan[0, :3] = [np.nan, np.inf, -np.inf]
  trees.append([jnp.asarray(with_nan), jnp.asarray(rng.standard_normal(50), jnp.float32)])
  for tree in trees:
    for fraction in (0.01, 0.5, 0.6, 1.0):
      np.testing.assert_array_equal(_unpacked_threshold(tree, fraction, sample=False),
                                    oracles.threshold(_leaves_of(tree), fraction))


# --- warm starts: last step's τ as the hint ---------------------------------------------------

def _drifting_sequences(rng, shapes):
  """Gradient sequences a warm start must survive, each a list of trees: slow drift, jumps
  by 10^±3, NaN/Inf appearing in places, sign flips, and a collapse to all-equal values."""
  base = {f"w{i}": rng.standard_t(3.0, size=s).astype(np.float32) for i, s in enumerate(shapes)}
  noise = lambda: {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
  drift = [{k: v * (1 + 0.02 * t) + 0.05 * n[k] for k, v in base.items()}
           for t, n in ((t, noise()) for t in range(6))]
  jumps = [{k: v * scale for k, v in base.items()} for scale in (1.0, 1e3, 1e3, 1e-3, 1.0)]
  broken = []
  for t in range(4):
    tree = {k: v.copy() for k, v in base.items()}
    first = tree["w0"].reshape(-1)
    first[: 3 * t] = [np.nan, np.inf, -np.inf] * t
    broken.append(tree)
  flips = [{k: v * np.where(rng.random(v.shape) < 0.5, -1, 1).astype(np.float32)
            for k, v in base.items()} for _ in range(3)]
  equal = [{k: np.full_like(v, value) for k, v in base.items()} for value in (0.5, 0.5, 0.0)]
  shrink = [{k: v * 0.5 ** t + (1 - 0.5 ** t) * 0.25 for k, v in base.items()}
            for t in range(4)] + equal
  return {"drift": drift, "jumps": jumps, "non-finite": broken, "sign flips": flips,
          "to all-equal": shrink}


@pytest.mark.parametrize("shapes", [[(30, 20), (7,), (50,)],  # one packed leaf
                                    # unpacked, > 2^18: 19 s, slow; the packed-leaves test
                                    # warm-starts two such leaves in the default suite
                                    pytest.param([(300, 500), (400, 400), (1000,)],
                                                 marks=pytest.mark.slow)])
def test_a_warm_started_threshold_equals_numpy_step_after_step(shapes):
  """τ from last step's τ as the hint equals NumPy's k-th largest at every step of every
  sequence, for global and per-leaf thresholds, with a static and a traced fraction."""
  rng = np.random.default_rng(7)
  global_threshold = jax.jit(lambda t, f, h: optclip.clip_threshold(t, f, hint=h))
  per_leaf = jax.jit(lambda t, f, h: optclip.clip_threshold(t, f, per_leaf=True, hint=h),
                     static_argnums=1)
  for name, sequence in _drifting_sequences(rng, shapes).items():
    for fraction in (0.001, 0.1, 0.5, 1.0):
      hint, hints = jnp.float32(jnp.inf), {k: jnp.float32(jnp.inf) for k in sequence[0]}
      for step, tree in enumerate(sequence):
        tree = jax.tree.map(jnp.asarray, tree)
        hint = global_threshold(tree, jnp.float32(fraction), hint)
        want = oracles.threshold(jax.tree.leaves(tree), np.float32(fraction))
        assert np.float32(hint) == np.float32(want), (name, fraction, step)
        hints = per_leaf(tree, fraction, hints)
        for key in tree:
          assert np.float32(hints[key]) == np.float32(oracles.threshold(
              [tree[key]], fraction)), (name, fraction, step, key)


def test_the_warm_path_saves_passes_and_a_missed_bracket_falls_back_exactly():
  """On a 1M-coordinate tree, a hint within 0.5% of τ needs no more narrowing passes than the
  cold search (and no sample), τ itself none at all; hints far off (x1000, /1000, 0, inf,
  NaN: outside every warm pivot) miss the bracket and still give τ bit for bit."""
  from optclip import _selection
  rng = np.random.default_rng(3)
  leaves = [jnp.asarray(rng.standard_t(3.0, size=(1000, 500)).astype(np.float32)),
            jnp.asarray(rng.standard_normal((500, 1000)).astype(np.float32))]
  fmt = _selection.key_format([jnp.float32])
  search = jax.jit(lambda l, h: _selection.kth_largest_keys(l, 0.1, hint=h))
  cold_keys, cold_passes, _ = jax.jit(lambda l: _selection.kth_largest_keys(l, 0.1))(leaves)
  tau = np.float32(_selection.key_to_value(cold_keys, fmt)[0])
  assert tau == np.float32(oracles.threshold(leaves, 0.1))
  keys, passes, _ = search(leaves, jnp.asarray([tau * 1.004], jnp.float32))
  assert int(keys[0]) == int(cold_keys[0]) and int(passes) <= int(cold_passes)
  keys, passes, _ = search(leaves, jnp.asarray([tau], jnp.float32))
  assert int(keys[0]) == int(cold_keys[0]) and int(passes) == 0
  for far in (tau * 1000, tau / 1000, 0.0, np.inf, np.nan):
    keys, _, _ = search(leaves, jnp.asarray([far], jnp.float32))
    assert int(keys[0]) == int(cold_keys[0]), far


def test_clipped_optimizers_warm_start_under_optax_machinery():
  """adam(clip) under jit, inject_hyperparams (the fraction changing every step) and
  MultiSteps follows the NumPy transcription of Algorithm 4 over a drifting sequence: the
  state's τ, which warm-starts the next search, never changes a result."""
  rng = np.random.default_rng(11)
  grads_seq = [{k: jnp.asarray(v) for k, v in tree.items()}
               for tree in _drifting_sequences(rng, [(40, 30), (25,)])["drift"]]
  params = jax.tree.map(jnp.zeros_like, grads_seq[0])
  want = oracles.adam([[np.asarray(g[k]) for k in sorted(g)] for g in grads_seq],
                      1e-2, 0.9, 0.999, 1e-8, 0.5, None)
  tx = optclip.adam(1e-2, clip=0.5)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for g, w in zip(grads_seq, want):
    updates, state = step(g, state, params)
    for got, expected in zip([updates[k] for k in sorted(updates)], w):
      np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=1e-7)
  # A traced fraction that changes every step: τ still NumPy's at each step.
  injected = optax.inject_hyperparams(optclip.coord_clip)(fraction=0.5)
  state = injected.init(params)
  step = jax.jit(injected.update)
  for i, g in enumerate(grads_seq):
    fraction = (0.5, 0.01, 0.3, 1.0, 0.2, 0.05)[i]
    state.hyperparams["fraction"] = jnp.float32(fraction)
    clipped, state = step(g, state)
    tau = oracles.threshold(jax.tree.leaves(g), np.float32(fraction))
    np.testing.assert_array_equal(np.asarray(state.inner_state.threshold), np.float32(tau))
    for got, raw in zip(jax.tree.leaves(clipped), jax.tree.leaves(g)):
      np.testing.assert_array_equal(np.asarray(got), np.clip(np.asarray(raw), -tau, tau))
  # MultiSteps: the clip sees each mini-batch's gradient; its τ carries across them.
  multi = optax.MultiSteps(optax.chain(optclip.coord_clip(0.1), optax.sgd(1.0)), 2)
  state = multi.init(params)
  step = jax.jit(multi.update)
  for g in grads_seq:
    _, state = step(g, state, params)
  mean = jax.tree.map(lambda a, b: a + (b - a) / 2, grads_seq[-2], grads_seq[-1])  # optax's
  tau = oracles.threshold(jax.tree.leaves(mean), 0.1)
  np.testing.assert_array_equal(np.asarray(state.inner_opt_state[0].threshold),
                                np.float32(tau))


def test_small_leaves_are_searched_packed_and_the_threshold_stays_exact():
  """A tree over 2^18 coordinates (so not concatenated whole) with 40 small leaves of mixed
  float dtypes beside two large ones, NaN and Inf among them: the small leaves are searched
  as one packed vector (the program has a fraction of the reductions) and τ equals NumPy's
  k-th largest, cold and warm-started."""
  from optclip import _selection
  rng = np.random.default_rng(11)
  dtypes = (jnp.float32, jnp.bfloat16, jnp.float16)
  tree = {f"small{i}": jnp.asarray(rng.standard_t(2, int(rng.integers(1, 5000))),
                                   jnp.float32).astype(dtypes[i % 3]) for i in range(40)}
  tree["big0"] = jnp.asarray(rng.standard_t(3, (300, 500)), jnp.float32)
  tree["big1"] = jnp.asarray(rng.standard_normal((200, 400)) * 1e-3, jnp.float32)
  tree["small3"] = tree["small3"].at[:2].set(jnp.array([jnp.nan, jnp.inf], jnp.float16))
  leaves = jax.tree.leaves(tree)
  assert sum(l.size for l in leaves) > 2 ** 18

  def reductions(pack_below):
    text = jax.jit(lambda l: _selection.kth_largest_keys(l, 0.1, pack_below=pack_below)).lower(
        leaves).as_text()
    return text.count("stablehlo.reduce")
  assert reductions(_selection.PACK_BELOW) * 4 < reductions(0)
  threshold = jax.jit(lambda t, f, h: optclip.clip_threshold(t, f, hint=h),
                      static_argnums=1)
  for fraction in (1e-4, 0.1, 0.5, 1.0):
    want = oracles.threshold(leaves, fraction)
    cold = threshold(tree, fraction, None)
    np.testing.assert_array_equal(np.float64(cold), want)
    # warm from a nearby τ, and from a far one (the bracket misses)
    for hint in (np.float32(want) * 1.01, np.float32(want) * 1e4 + 1):
      np.testing.assert_array_equal(np.float64(threshold(tree, fraction, hint)), want)


@pytest.mark.parametrize("per_leaf", [False, True])
def test_clip_statistics_against_numpy_with_non_finite_entries(per_leaf):
  """clipped_count and clipped_fraction (over the finite coordinates only: the count the
  search's first pass makes) and both norms, with NaN/Inf entries, a bfloat16 and an int
  leaf, global and per-leaf thresholds."""
  rng = np.random.default_rng(11)
  a = rng.standard_t(3.0, size=(40, 30)).astype(np.float32)
  a[3, 4], a[7, 1], a[9, 9] = np.nan, np.inf, -np.inf
  b = rng.standard_normal(300).astype(np.float32)
  b[5] = np.inf
  c = rng.standard_normal((7, 9)).astype(np.float32)
  tree = {"a": jnp.asarray(a), "b": jnp.asarray(b), "c": jnp.asarray(c, jnp.bfloat16),
          "steps": jnp.arange(4)}
  as_numpy = {"a": a, "b": b, "c": np.asarray(tree["c"].astype(jnp.float32))}
  tx = optclip.coord_clip(0.2, per_leaf=per_leaf)
  state = jax.jit(tx.update)(tree, tx.init(tree))[1]
  flat = {name: np.asarray(x, np.float64).ravel() for name, x in as_numpy.items()}
  taus = ({name: oracles.threshold([x], 0.2) for name, x in flat.items()} if per_leaf else
          dict.fromkeys(flat, oracles.threshold(list(flat.values()), 0.2)))
  count = sum(int(np.sum(np.isfinite(x) & (np.abs(x) > taus[n]))) for n, x in flat.items())
  finite = sum(int(np.sum(np.isfinite(x))) for x in flat.values())
  assert finite == a.size + b.size + c.size - 4
  assert int(state.clipped_count) == count > 0
  np.testing.assert_allclose(float(state.clipped_fraction), count / finite, rtol=1e-6)
  assert np.isnan(float(state.norm_before)) and np.isnan(float(state.norm_after))
  # Without the NaN: infinite norms, and one finite coordinate more.
  tree["a"] = tree["a"].at[3, 4].set(0.0)
  state = jax.jit(tx.update)(tree, tx.init(tree))[1]
  assert float(state.norm_before) == np.inf == float(state.norm_after)
  flat["a"][3 * 30 + 4] = 0.0
  taus = ({name: oracles.threshold([x], 0.2) for name, x in flat.items()} if per_leaf else
          dict.fromkeys(flat, oracles.threshold(list(flat.values()), 0.2)))
  count = sum(int(np.sum(np.isfinite(x) & (np.abs(x) > taus[n]))) for n, x in flat.items())
  assert int(state.clipped_count) == count
  np.testing.assert_allclose(float(state.clipped_fraction), count / (finite + 1), rtol=1e-6)
