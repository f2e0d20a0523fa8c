"""make_mixer: each buffer draws exactly its share, with its own distribution over its whole
tree; split() gives parts that set_priorities takes; can_sample needs every buffer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import flax_replay as fbx
from flax_replay._src import sum_tree

ALPHA = 0.6
DRAWS = 2000


def make(max_length, sample_batch_size=8):
    return fbx.make_prioritised_flat_buffer(max_length=max_length, min_length=1,
                                            sample_batch_size=sample_batch_size,
                                            add_batch_size=2, priority_exponent=ALPHA)


def filled(buffer, offset, steps):
    """Rows of `steps` steps whose obs is offset + row * 1000 + t (buffer, row, time)."""
    state = buffer.init({"obs": jnp.int32(0)})
    add = jax.jit(buffer.add)
    for t in range(steps):
        state = add(state, {"obs": jnp.int32(offset) + jnp.array([0, 1000], jnp.int32) + t})
    return state


@pytest.fixture(scope="module")
def two_buffers():
    # 2 rows x 15 steps, 2 rows x 31 steps: 30 and 62 leaves, so both leaf levels have padding.
    a, b = make(30), make(62)
    state_a, state_b = filled(a, 0, 20), filled(b, 100_000, 30)
    # Buffer b: priorities rise with the leaf, so most of its mass sits at the end of its
    # tree (what a mixer that keeps the first rows of a sorted sample never reaches).
    n_b = b.core.num_items
    state_b = b.set_priorities(state_b, jnp.arange(n_b), 0.1 + jnp.arange(n_b) ** 2 / 50.0)
    rng = np.random.default_rng(0)
    state_a = a.set_priorities(state_a, jnp.arange(a.core.num_items),
                               jnp.asarray(rng.uniform(0.2, 4.0, a.core.num_items)))
    return (a, state_a), (b, state_b)


def leaf_weights(buffer, state):
    tree, geo = state.priority_state.sum_tree, buffer.core.tree_geometry
    return np.asarray(sum_tree.leaves(tree, geo), np.float64)


@pytest.mark.parametrize("batch,proportions", [
    (16, [1, 3]), (10, [1, 1, 1]), (7, [0.2, 0.3, 0.5]), (5, [0, 1]), (9, [2, 1e-9]),
])
def test_batch_sizes_are_the_shares_and_sum_to_the_batch(two_buffers, batch, proportions):
    (a, _), _ = two_buffers
    mixer = fbx.make_mixer([a] * len(proportions), batch, proportions)
    sizes = mixer.batch_sizes
    assert sum(sizes) == batch and len(sizes) == len(proportions)
    exact = batch * np.asarray(proportions) / sum(proportions)
    assert np.all(np.abs(np.asarray(sizes) - exact) < 1), (sizes, exact)


@pytest.fixture(scope="module")
def draws(two_buffers):
    """DRAWS mixed samples of 16 (4 from a, 12 from b), and, for contrast, 200 full batches
    of 16 from b alone; one jitted call."""
    (a, state_a), (b, state_b) = two_buffers
    mixer = fbx.make_mixer([a, b], 16, [1, 3])

    @jax.jit
    def draw(states, key):
        keys = jax.random.split(key, DRAWS)
        mixed = jax.vmap(mixer.sample, in_axes=(None, 0))(states, keys)
        full = jax.vmap(lambda k: b.sample(states[1], k, batch_size=16))(keys[:200])
        return mixed, full

    return mixer, *draw((state_a, state_b), jax.random.key(0))


def test_each_part_has_its_buffers_distribution(two_buffers, draws):
    (a, state_a), (b, state_b) = two_buffers
    mixer, sample, full = draws
    assert mixer.batch_sizes == (4, 12)
    assert sample.indices.shape == (DRAWS, 16)
    obs = np.asarray(sample.experience.first["obs"])
    assert np.all(obs[:, :4] < 100_000) and np.all(obs[:, 4:] >= 100_000)  # exactly its share
    for name, buf, state, cols in (("a", a, state_a, slice(0, 4)),
                                   ("b", b, state_b, slice(4, 16))):
        idx = np.asarray(sample.indices[:, cols]).ravel()
        w = leaf_weights(buf, state)
        counts = np.bincount(idx, minlength=w.size)
        assert counts[w == 0].sum() == 0
        keep = w > 0
        expected = w[keep] / w[keep].sum() * idx.size
        p = stats.chisquare(counts[keep], expected).pvalue
        print(f"mixer part {name}: chi-square p = {p:.4f} over {keep.sum()} items, "
              f"{idx.size} draws")
        assert p > 1e-3
    # The whole of b's tree is reached: draws land in each quarter of its CDF (by the midpoint
    # of the leaf's interval) as often as that quarter's mass says.
    w = leaf_weights(b, state_b)
    upper = np.cumsum(w) / w.sum()
    lower = upper - w / w.sum()
    quarter = np.minimum((lower + upper) * 2, 3).astype(int)  # midpoint * 4
    idx_b = np.asarray(sample.indices[:, 4:]).ravel()
    mass = np.bincount(quarter, weights=w / w.sum(), minlength=4)
    np.testing.assert_allclose(np.bincount(quarter[idx_b], minlength=4) / idx_b.size, mass,
                               atol=0.01)
    assert lower[idx_b].max() > 0.9
    # Why it matters: a stratified sample is sorted by tree position, so keeping the first 12
    # of a full 16 (Flashbax's mixer) never gets past three quarters of the CDF.
    assert lower[np.asarray(full.indices[:, :12])].max() < 0.75


def test_split_parts_feed_set_priorities(two_buffers, draws):
    (a, state_a), (b, state_b) = two_buffers
    mixer, many, _ = draws
    sample = jax.tree.map(lambda x: x[0], many)  # one mixed batch
    part_a, part_b = mixer.split(sample)
    assert part_a.indices.shape == (4,) and part_b.indices.shape == (12,)
    assert isinstance(part_b, fbx.PrioritisedSample)
    np.testing.assert_array_equal(part_b.indices, sample.indices[4:])
    new_a = a.set_priorities(state_a, part_a, jnp.full(4, 7.0))  # the part carries versions
    new_b = b.set_priorities(state_b, part_b, jnp.full(12, 9.0))
    for buf, old, new, part, p in ((a, state_a, new_a, part_a, 7.0),
                                   (b, state_b, new_b, part_b, 9.0)):
        before, after = leaf_weights(buf, old), leaf_weights(buf, new)
        touched = np.unique(np.asarray(part.indices))
        np.testing.assert_allclose(after[touched], np.float32(p) ** np.float32(ALPHA), rtol=1e-6)
        untouched = np.setdiff1d(np.arange(before.size), touched)
        np.testing.assert_array_equal(after[untouched], before[untouched])


def test_zero_share_gives_an_empty_part_that_set_priorities_accepts(two_buffers):
    (a, state_a), (b, state_b) = two_buffers
    mixer = fbx.make_mixer([a, b], 8, [0, 1])
    sample = mixer.sample((state_a, state_b), jax.random.key(2))
    assert np.all(np.asarray(sample.experience.first["obs"]) >= 100_000)
    part_a, part_b = mixer.split(sample)
    assert part_a.indices.shape == (0,) and part_b.indices.shape == (8,)
    same = a.set_priorities(state_a, part_a, jnp.zeros((0,)))
    np.testing.assert_array_equal(same.priority_state.sum_tree, state_a.priority_state.sum_tree)


def test_can_sample_needs_every_buffer(two_buffers):
    (a, state_a), (b, state_b) = two_buffers
    mixer = fbx.make_mixer([a, b], 8, [1, 1])
    can_sample = jax.jit(mixer.can_sample)
    assert bool(can_sample((state_a, state_b)))
    empty_b = b.init({"obs": jnp.int32(0)})
    assert not bool(can_sample((state_a, empty_b)))
    assert not bool(mixer.can_sample((a.init({"obs": jnp.int32(0)}), state_b)))
    with pytest.raises(ValueError, match="states"):
        mixer.sample((state_a,), jax.random.key(0))
    with pytest.raises(ValueError, match="proportion"):
        fbx.make_mixer([a, b], 8, [1])


# ------------------------------------------------------------------------------- episodes
def _episode_buffers():
    """A padded episode-aware buffer, a plain trajectory buffer of the same sequences, and a
    filled state of each (episodes of 1 to 4 steps, so many padded windows)."""
    import warnings

    kw = dict(add_batch_size=2, sample_batch_size=8, sample_sequence_length=4, period=1,
              min_length_time_axis=4, max_length_time_axis=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        padded = fbx.make_trajectory_buffer(**kw, episode_end_key="done",
                                            sequence_mode="padded")
        plain = fbx.make_trajectory_buffer(**kw)
    example = {"id": jnp.int32(0), "done": jnp.bool_(False)}
    rng = np.random.default_rng(4)
    batch = {"id": jnp.arange(1, 25, dtype=jnp.int32).reshape(2, 12),
             "done": jnp.asarray(rng.random((2, 12)) < 0.4)}
    return [(b, jax.jit(b.add)(b.init(example), batch)) for b in (padded, plain)]


def test_mixer_concatenates_padded_masks():
    """Masks are concatenated like the experience; a part without a mask (every step real)
    gets an all-True one; each part is exactly its buffer's own sample."""
    (padded, s_pad), (plain, s_plain) = _episode_buffers()
    key = jax.random.key(3)
    for buffers, states in [((padded, plain), (s_pad, s_plain)),
                            ((padded, padded), (s_pad, s_pad))]:
        mixer = fbx.make_mixer(list(buffers), 12, [2, 1])
        out = jax.jit(mixer.sample)(list(states), key)
        assert out.mask.shape == (12, 4) and out.experience["id"].shape == (12, 4)
        keys = jax.random.split(key, 2)
        for part, buf, state, k, n in zip(mixer.split(out), buffers, states, keys,
                                          mixer.batch_sizes):
            own = jax.jit(buf.sample, static_argnums=2)(state, k, n)
            np.testing.assert_array_equal(part.experience["id"], own.experience["id"])
            want = own.mask if hasattr(own, "mask") else np.ones((n, 4), bool)
            np.testing.assert_array_equal(part.mask, want)
        # Padding is zeros and masked off in the padded part; real steps are ids > 0.
        np.testing.assert_array_equal(np.asarray(out.experience["id"]) > 0, out.mask)
    assert not np.asarray(out.mask).all(), "the fixture must hold padded windows"


def test_mixer_refuses_mask_with_other_sequences():
    (padded, s_pad), _ = _episode_buffers()
    flat = fbx.make_flat_buffer(max_length=16, min_length=2, sample_batch_size=4,
                                add_sequences=True)
    s_flat = flat.add(flat.init({"id": jnp.int32(0), "done": jnp.bool_(False)}),
                      {"id": jnp.arange(1, 5, dtype=jnp.int32), "done": jnp.zeros(4, bool)})
    mixer = fbx.make_mixer([padded, flat], 8, [1, 1])
    with pytest.raises(ValueError, match=r"mixing padded sequences \(mask \[B, 4\]\)"):
        mixer.sample([s_pad, s_flat], jax.random.key(0))


def test_mixer_refuses_uniform_with_prioritised_naming_them():
    kw = dict(max_length=16, min_length=2, sample_batch_size=4, add_batch_size=2)
    uniform, prioritised = fbx.make_flat_buffer(**kw), fbx.make_prioritised_flat_buffer(**kw)
    with pytest.raises(ValueError, match=r"buffers \[1\] are prioritised and \[0, 2\] are not"):
        fbx.make_mixer([uniform, prioritised, uniform], 8, [1, 1, 1])
