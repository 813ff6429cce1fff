"""Figure 6: training-loss curves of every optimizer with and without clipping, at Table 3's
learning rates. The quick preset scans multipliers of those rates on the first seed (the
tiny models train at other scales) and records the chosen one."""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax

import optclip
from experiments import common, paper_values
from experiments.presets import TABLE3_LEARNING_RATES

NAME = "convergence"

_FACTORIES = {
    "sgd": (optclip.sgd, {}), "sgd, clip grad 0.1": (optclip.sgd, {"clip": 0.1}),
    "adam": (optclip.adam, {}), "adam, clip grad 0.5": (optclip.adam, {"clip": 0.5}),
    "adafactor": (optclip.adafactor, {}),
    "adafactor, clip grad 0.5": (optclip.adafactor, {"clip": 0.5}),
    "lion": (optclip.lion, {}), "sign sgd": (optclip.sign_sgd, {}),
    "normalized sgd": (optclip.normalized_sgd, {}),
    "normalized sgd, clip grad 0.1": (optclip.normalized_sgd, {"clip": 0.1}),
}


def optimizer(name: str, learning_rate):
  factory, kwargs = _FACTORIES[name]
  if learning_rate is None:  # Adafactor's relative step size
    return factory(**kwargs)
  # The learning rate is a hyperparameter in the state: one compile serves every rate.
  return optax.inject_hyperparams(factory, static_args=tuple(kwargs))(
      learning_rate=learning_rate, **kwargs)


@functools.lru_cache(maxsize=None)
def _step(model, name: str, relative: bool, mesh=None):
  loss_fn = common.model_loss(model, mesh)
  tx = optimizer(name, None if relative else 1.0)
  return tx, common.train_step(loss_fn, tx)


def train_curve(task, name: str, learning_rate, seed: int, epochs: int, mesh=None) -> list:
  """Mean training loss per epoch; on ``mesh`` sharded as in `optclip.sharding.placement`."""
  from optclip import sharding
  context, place, place_batch = sharding.placement(mesh)
  with context:
    tx, step = _step(task.model, name, learning_rate is None, mesh)
    params = common.owned_copy(place(task.init_params(seed)))
    state = common.owned_copy(place(tx.init(params)))
    if learning_rate is not None:
      state.hyperparams["learning_rate"] = jax.numpy.asarray(learning_rate, jax.numpy.float32)
    curve = []
    for epoch in common.progress(range(epochs), desc=f"{task.name} {name} lr={learning_rate}"):
      losses = []
      for batch in task.epoch_batches(seed, epoch):
        params, state, loss = step(params, state, place_batch(batch))
        losses.append(loss)
      curve.append(float(np.mean(jax.device_get(losses))))
  return curve


def run(ctx) -> None:
  preset = ctx.preset
  for task_name, rates in TABLE3_LEARNING_RATES.items():
    for name, base_rate in rates.items():
      multipliers = (1.0,) if base_rate is None else preset.convergence_lr_multipliers
      chosen_key = f"{task_name}/{name}/chosen"
      if not ctx.metrics.has(chosen_key):
        first = ctx.seeds[0]
        task = ctx.task(task_name, first)
        finals = {}
        for m in multipliers:
          lr = None if base_rate is None else base_rate * m
          key = f"{task_name}/{name}/lr{m:g}/seed{first}"
          if not ctx.metrics.has(key):
            ctx.metrics.log(NAME, key, task=task_name, algorithm=name, learning_rate=lr,
                            multiplier=m, seed=first,
                            curve=train_curve(task, name, lr, first, preset.convergence_epochs,
                                              ctx.mesh))
          curve = next(r for r in ctx.metrics.records if r["key"] == key)["curve"]
          finals[m] = curve[-1] if np.isfinite(curve[-1]) else np.inf
        best = min(finals, key=finals.get)
        ctx.metrics.log(NAME, chosen_key, task=task_name, algorithm=name, multiplier=best,
                        table3_learning_rate=base_rate, scanned=list(multipliers))
      best = next(r for r in ctx.metrics.records if r["key"] == chosen_key)["multiplier"]
      lr = None if base_rate is None else base_rate * best
      for seed in ctx.seeds[1:]:
        key = f"{task_name}/{name}/lr{best:g}/seed{seed}"
        if not ctx.metrics.has(key):
          task = ctx.task(task_name, seed)
          ctx.metrics.log(NAME, key, task=task_name, algorithm=name, learning_rate=lr,
                          multiplier=best, seed=seed,
                          curve=train_curve(task, name, lr, seed, preset.convergence_epochs,
                                            ctx.mesh))


def write(out: str, records) -> tuple[str, list]:
  chosen = {(r["task"], r["algorithm"]): r for r in records if r["key"].endswith("/chosen")}
  rows, verdicts, sections = [], [], []
  for task in TABLE3_LEARNING_RATES:
    names = [n for (t, n) in chosen if t == task]
    if not names:
      continue
    fig, ax = common.new_figure(figsize=(6.5, 4.2))
    finals = {}
    import matplotlib.cm as cm
    bases = list(dict.fromkeys(n.split(",")[0] for n in names))
    for name in names:
      pick = chosen[(task, name)]
      curves = [r["curve"] for r in records if r.get("task") == task and
                r.get("algorithm") == name and "curve" in r and
                r["multiplier"] == pick["multiplier"]]
      mean = np.mean(np.asarray(curves, np.float64), axis=0)
      finals[name] = mean[-1]
      ax.plot(np.arange(1, len(mean) + 1), mean, label=name,
              color=cm.tab10(bases.index(name.split(",")[0]) % 10),
              alpha=0.45 if "clip" in name else 1.0,
              linestyle="--" if "clip" in name else "-")
      lr = pick["table3_learning_rate"]
      rows.append([task, name, "relative" if lr is None else lr, pick["multiplier"],
                   len(curves), mean[0], mean[-1], common.mean_std([c[-1] for c in curves])[1]])
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title(f"Convergence, {task} (Figure 6)")
    ax.legend(fontsize=6, ncol=2)
    common.save_figure(fig, common.figure_path(out, f"convergence_{task}"))
    wins = [(n, finals[n.split(",")[0]], finals[n]) for n in names
            if ", clip" in n and n.split(",")[0] in finals]
    if wins:
      better = sum(c < b for _, b, c in wins)
      verdicts.append(f"{paper_values.CLAIMS['convergence']} — {task}: "
                      f"**{'reproduced' if better == len(wins) else ('partly reproduced' if better else 'not reproduced')}**"
                      f", clipped variant ends lower in {better}/{len(wins)} pairs")
  table = common.write_table(out, "convergence", ["task", "algorithm", "Table 3 lr",
                                                  "lr multiplier used", "seeds",
                                                  "first-epoch loss", "final loss (mean)",
                                                  "final std"], rows)
  sections.append("### Convergence (Figure 6, Table 3 learning rates)\n\nThe multiplier is "
                  "the best of the preset's scan on the first seed (1 = Table 3 as published)."
                  "\n\nFigures: `figures/convergence_<task>.png`.\n\n" + table)
  return "\n\n".join(sections), verdicts
