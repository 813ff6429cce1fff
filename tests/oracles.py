"""Independent NumPy references for the tests (no optclip code is used here)."""

import math

import numpy as np


def finite_abs_values(tree_leaves):
  """All finite |g| of the floating leaves, as float64 (exact for f32/bf16 values)."""
  values = [np.abs(np.asarray(leaf, dtype=np.float64)).ravel() for leaf in tree_leaves
            if np.issubdtype(np.asarray(leaf).dtype, np.floating)
            or str(np.asarray(leaf).dtype) == "bfloat16"]
  if not values:
    return np.zeros((0,))
  v = np.concatenate(values)
  return v[np.isfinite(v)]


def top_count(fraction, n):
  return min(n, max(1, math.ceil(float(np.float64(fraction) * n))))


def threshold(tree_leaves, fraction):
  v = finite_abs_values(tree_leaves)
  if v.size == 0:
    return np.inf
  k = top_count(fraction, v.size)
  return np.sort(v)[::-1][k - 1]


def clip(leaves, fraction):
  """The paper's clip() on a list of float64 arrays with one global threshold."""
  if fraction is None:
    return [np.array(x, np.float64) for x in leaves]
  tau = threshold(leaves, fraction)
  return [np.sign(x) * np.minimum(np.abs(x), tau) for x in leaves]


def sgd(grads_seq, lr, beta, fraction, normalize=False, sign=False):
  m = [np.zeros_like(g, np.float64) for g in grads_seq[0]]
  out = []
  for grads in grads_seq:
    g_hat = clip(grads, fraction)
    m = [beta * mi + (1 - beta) * gi for mi, gi in zip(m, g_hat)]
    if normalize:
      step = [mi / np.linalg.norm(mi.ravel()) * math.sqrt(mi.size) for mi in m]
    elif sign:
      step = [np.sign(mi) for mi in m]
    else:
      step = m
    out.append([-lr * s for s in step])
  return out


def adam(grads_seq, lr, b1, b2, eps, fraction, update_fraction):
  m = [np.zeros_like(g, np.float64) for g in grads_seq[0]]
  v = [np.zeros_like(g, np.float64) for g in grads_seq[0]]
  out = []
  for t, grads in enumerate(grads_seq, start=1):
    g_hat = clip(grads, fraction)
    m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g_hat)]
    v = [b2 * vi + (1 - b2) * np.square(gi) for vi, gi in zip(v, grads)]
    u = [(mi / (1 - b1 ** t)) / (np.sqrt(vi / (1 - b2 ** t)) + eps) for mi, vi in zip(m, v)]
    u = clip(u, update_fraction)
    out.append([-lr * ui for ui in u])
  return out


def lion(grads_seq, lr, b1, b2, fraction, update_fraction):
  m = [np.zeros_like(g, np.float64) for g in grads_seq[0]]
  out = []
  for grads in grads_seq:
    g_hat = clip(grads, fraction)
    c = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g_hat)]
    if update_fraction is None:
      u = [np.sign(ci) for ci in c]
    else:
      tau = threshold(c, update_fraction)
      u = [x / tau for x in clip(c, update_fraction)]
    m = [b2 * mi + (1 - b2) * gi for mi, gi in zip(m, g_hat)]
    out.append([-lr * ui for ui in u])
  return out


def adafactor(grads_seq, params_seq, lr, fraction, eps1=1e-30, eps2=1e-3, d=1.0, scale=True):
  """Algorithms 7 (matrices: ndim == 2) and 8 (vectors) of the paper; a fixed ``lr`` is
  multiplied by max(eps2, RMS(x)) where ``scale`` (the paper's code, torch_optimizer/
  adafactor.py: ``lr = param_scale * rel_step_sz`` with ``scale_parameter=True``)."""
  state = []
  for g in grads_seq[0]:
    if g.ndim == 2:
      state.append([np.zeros(g.shape[0]), np.zeros(g.shape[1])])
    else:
      state.append([np.zeros(g.shape)])
  out = []
  for t, (grads, params) in enumerate(zip(grads_seq, params_seq), start=1):
    beta = 1 - t ** -0.8
    rho = min(1e-2, 1 / math.sqrt(t))
    g_hat = clip(grads, fraction)
    step = []
    for i, (g, gh, p) in enumerate(zip(grads, g_hat, params)):
      sq = np.square(np.asarray(g, np.float64)) + eps1
      if g.ndim == 2:
        r = beta * state[i][0] + (1 - beta) * sq.sum(axis=1)
        c = beta * state[i][1] + (1 - beta) * sq.sum(axis=0)
        state[i] = [r, c]
        v_hat = np.outer(r, c) / r.sum()
      else:
        v = beta * state[i][0] + (1 - beta) * sq
        state[i] = [v]
        v_hat = v
      u = gh / np.sqrt(v_hat)
      u = u / max(1.0, math.sqrt(np.mean(u ** 2)) / d)
      rms = math.sqrt(np.mean(np.square(np.asarray(p, np.float64))))
      alpha = (rho if lr is None else lr) * (max(eps2, rms) if scale else 1.0)
      step.append(-alpha * u)
    out.append(step)
  return out
