"""One checkpoint reader: what training resumes from (`Checkpointer.restore`) is what generation
and evaluation load (`loading.restore_params`), on intact and damaged checkpoints alike; nothing
non-finite is loaded."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from idcrafter_jax.inference import loading
from idcrafter_jax.training import checkpoint as ckpt_lib, train_state


def _state(scale):
  params = {"w": jnp.arange(4.0) * scale, "b": {"c": jnp.full((2, 3), scale)}}
  return train_state.init_state(params, optax.adam(0.1), jax.random.key(0), ema=True)


def _truncate(path, size=5):
  with open(path, "r+b") as f:
    f.truncate(size)


def _array_files(step_dir):
  return sorted(os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state"))
                for f in fs if os.path.basename(r) == "d")


def _garbage_json(path):
  with open(path, "w") as f:
    f.write("{garbage")


DAMAGE = {
    "intact": lambda s: None,
    "sharding truncated": lambda s: _truncate(os.path.join(s, "state", "_sharding")),
    "arrays truncated": lambda s: [_truncate(p) for p in _array_files(s)],
    "arrays deleted": lambda s: [os.remove(p) for p in _array_files(s)],
    "_METADATA deleted": lambda s: os.remove(os.path.join(s, "state", "_METADATA")),
    "data JSON garbage": lambda s: _garbage_json(os.path.join(s, "data", "metadata")),
    "meta JSON garbage": lambda s: _garbage_json(os.path.join(s, "meta", "metadata")),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("ck") / "checkpoints")
  ck = ckpt_lib.Checkpointer(d, save_every=1, async_save=False)
  ck.save(1, _state(1.0), {"pos": 1})
  ck.save(2, _state(2.0), {"pos": 2})
  ck.close()
  return d


def _both(d):
  """(step restore_params loads or its error, step Checkpointer.restore resumes from or None)."""
  like = _state(0.0)
  try:
    w = np.asarray(loading.restore_params(os.path.dirname(d), like.params)["w"])
    loaded = int(w[1])  # params "w" of step s are arange(4) * s
  except ValueError as e:
    loaded = str(e)
  ck = ckpt_lib.Checkpointer(d, save_every=1, async_save=False)
  restored = ck.restore(ckpt_lib.abstract_like(like))
  ck.close()
  return loaded, restored


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_training_and_generation_read_the_same_step(saved, tmp_path, damage):
  d = str(tmp_path / "checkpoints")
  shutil.copytree(saved, d)
  DAMAGE[damage](os.path.join(d, "2"))
  loaded, restored = _both(d)
  want = 2 if damage == "intact" else 1
  assert loaded == want and restored is not None and restored[0] == want
  step, state, data, meta = restored
  assert data == {"pos": want} and meta["step"] == want
  assert np.asarray(state.params["w"]).tolist() == (np.arange(4.0) * want).tolist()


@pytest.mark.parametrize("damage", [k for k in DAMAGE if k != "intact"])
def test_a_damaged_only_step_is_used_by_neither_and_named(saved, tmp_path, damage, capsys):
  d = str(tmp_path / "checkpoints")
  os.makedirs(d)
  shutil.copytree(os.path.join(saved, "2"), os.path.join(d, "2"))
  DAMAGE[damage](os.path.join(d, "2"))
  loaded, restored = _both(d)
  assert restored is None and isinstance(loaded, str)
  assert "no readable ID-Crafter checkpoint" in loaded and os.path.join(d, "2") in loaded
  assert f"checkpoint step 2 in {d} is unreadable" in capsys.readouterr().out


def test_non_finite_values_are_refused_by_both_naming_the_leaf(tmp_path):
  d = str(tmp_path / "checkpoints")
  ck = ckpt_lib.Checkpointer(d, save_every=1, async_save=False)
  ck.save(1, _state(1.0), {"pos": 1})
  bad = _state(2.0)
  ck.save(2, bad.replace(params={"w": bad.params["w"].at[0].set(jnp.nan), "b": bad.params["b"]}), {"pos": 2})
  ck.close()
  with pytest.raises(ValueError, match=r"2/state holds non-finite values .* params\.w"):
    loading.restore_params(os.path.join(d, "2"), _state(0.0).params)
  loaded, restored = _both(d)
  assert loaded == 1 and restored[0] == 1


def test_read_state_without_an_abstract_tree_returns_the_saved_arrays(saved):
  tree = loading.read_state(os.path.join(saved, "2", "state"))
  assert np.asarray(tree["params"]["w"]).tolist() == [0.0, 2.0, 4.0, 6.0]
  with pytest.raises(loading.UnreadableCheckpoint, match="holds no Orbax checkpoint"):
    loading.read_state(saved)
