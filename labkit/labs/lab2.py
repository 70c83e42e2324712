"""Lab 2, seeing smoothing (``labs/lab2_seeing_smoothing.ipynb``): the panel and the figures.

Reproduces Sato & Iiduka (2024) Fig. 3 and Sato & Iiduka's (2023) picture of graduated
optimization: the smoothed
function ``f_hat_delta(x) = E_u[f(x - delta u)]`` of Rastrigin, Ackley and Styblinski-Tang in
1-D and 2-D (closed form where :mod:`labkit.smoothing` has one, Monte Carlo otherwise), and
gradient descent, noisy SGD and graduated optimization (:mod:`labkit.graduated`) from the same
start. Book: chapters 6 (smoothing, Sato & Iiduka (2024)) and 7 (graduated optimization, Sato &
Iiduka (2023)).

Lab 2 trains nothing: :func:`panel` is a :class:`labkit.widgets.ControlPanel` that computes
the three methods' paths (:func:`run`) and draws them, with :func:`controls`,
:func:`defaults` and :func:`validate` as in the labs that train (there is no grid).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from labkit import widgets as lk_widgets
from labkit.labs.setup import check_profile, is_positive

__all__ = [
    "FUNCTIONS",
    "LAB_ID",
    "Result",
    "controls",
    "defaults",
    "delta_table",
    "panel",
    "paper_figure",
    "parse_point",
    "reached",
    "run",
    "smoothed",
    "validate",
]

#: The lab's notebook, without ``.ipynb``.
LAB_ID = "lab2_seeing_smoothing"


@dataclass(frozen=True)
class _Function:
    name: str
    f: Callable[..., Any]
    argmin: float  # global minimizer, the same in every coordinate
    x0: tuple[str, str]  # default start in 1-D and 2-D, as typed in the panel
    lr: float
    sgd_noise: float
    view: tuple[float, float]  # plotting range of each coordinate


def _functions() -> dict[str, _Function]:
    from labkit import smoothing as S

    return {
        "rastrigin": _Function("Rastrigin", S.rastrigin, 0.0, ("2.2", "2.2, -1.8"), 0.004,
                               100.0, (-3.5, 3.5)),
        "ackley": _Function("Ackley", S.ackley, 0.0, ("2.2", "2.2, -1.8"), 0.004, 25.0,
                             (-3.5, 3.5)),
        "styblinski_tang": _Function("Styblinski-Tang", S.styblinski_tang,
                                     S.STYBLINSKI_TANG_ARGMIN, ("2.2", "2.2, -1.8"), 0.01,
                                     50.0, (-4.5, 4.5)),
    }


#: name -> (label, global minimizer per coordinate, default lr) of lab 2's test functions.
FUNCTIONS: dict[str, tuple[str, float, float]] = {
    k: (v.name, v.argmin, v.lr) for k, v in _functions().items()
}
_DIST_LABELS = {"gaussian": "Gaussian u ~ N(0, I/d) (Sato & Iiduka (2024))",
                "ball": "uniform on the unit ball (Sato & Iiduka (2023))"}
_SAMPLES = {"smoke": 64, "short": 256, "paper": 1024}


def controls() -> dict[str, Any]:
    """The knobs of lab 2's panel."""
    W = lk_widgets
    return {
        "function": W.dropdown("function", [(v[0], k) for k, v in FUNCTIONS.items()]),
        "dim": W.dropdown("dimension", [("1-D", 1), ("2-D", 2)]),
        "delta": W.float_slider("δ of the plotted f̂_δ", 0.0, 3.0, 0.4, 0.05),
        "dist": W.dropdown("noise u", [(v, k) for k, v in _DIST_LABELS.items()]),
        "x0": W.text("start x0", "2.2"),
        "lr": W.float_text("learning rate", 0.004),
        "steps": W.int_text("steps (each method)", 1000),
        "sgd_noise": W.float_text("SGD: gradient noise σ", 100.0),
        "delta0": W.float_text("graduated: δ₀", 2.0),
        "stages": W.int_slider("graduated: halvings M", 1, 8, 4),
        "n_samples": W.int_text("Monte-Carlo samples", 64),
        "seed": W.int_text("seed", 0),
    }


def defaults(profile: str) -> dict[str, Any]:
    """The knob values of each profile (only the Monte-Carlo sample count differs)."""
    check_profile(profile)
    return {"function": "rastrigin", "dim": 1, "delta": 0.4, "dist": "gaussian", "x0": "2.2",
            "lr": 0.004, "steps": 1000, "sgd_noise": 100.0, "delta0": 2.0, "stages": 4,
            "n_samples": _SAMPLES[profile], "seed": 0}


def parse_point(text: str, d: int) -> list[float]:
    """``"2.2, -1.8"`` -> ``[2.2, -1.8]``, checked to have ``d`` finite coordinates.

    Raises:
        ValueError: not ``d`` comma-separated finite numbers.
    """
    parts = [p for p in str(text).replace(";", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(
            f"x0 must be {d} comma-separated number(s) like {', '.join(['2.2'] * d)}; "
            f"got {text!r}"
        ) from None
    if len(values) != d or not all(math.isfinite(v) for v in values):
        raise ValueError(
            f"x0 must be {d} finite number(s) for a {d}-D function (e.g. "
            f"{', '.join(['2.2'] * d)}); got {text!r}"
        )
    return values


def validate(values: Mapping[str, Any]) -> list[str]:
    """Why lab 2's knobs cannot run, as messages (empty when they can)."""
    msgs = []
    if values.get("function") not in FUNCTIONS:
        msgs.append(f"function must be one of {', '.join(FUNCTIONS)}; "
                    f"got {values.get('function')!r}")
    d = values.get("dim")
    if d not in (1, 2):
        msgs.append(f"dimension must be 1 or 2; got {d!r}")
    else:
        try:
            parse_point(values.get("x0", ""), d)
        except ValueError as e:
            msgs.append(str(e))
    checks = [("lr", "learning rate", is_positive), ("delta0", "graduated δ₀", is_positive)]
    for key, label, ok in checks:
        if not ok(values.get(key)):
            msgs.append(f"{label} must be > 0; got {values.get(key)}")
    delta = values.get("delta")
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta >= 0):
        msgs.append(f"δ must be >= 0; got {delta}")
    noise = values.get("sgd_noise")
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        msgs.append(f"SGD gradient noise σ must be >= 0; got {noise}")
    for key, label, low in (("steps", "steps", 1), ("stages", "graduated halvings M", 1),
                            ("n_samples", "Monte-Carlo samples", 1), ("seed", "seed", 0)):
        v = values.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            msgs.append(f"{label} must be an integer >= {low}; got {v}")
    steps, stages = values.get("steps"), values.get("stages")
    if isinstance(steps, int) and isinstance(stages, int) and 1 <= stages and 1 <= steps <= stages:
        msgs.append(f"steps ({steps}) must exceed the graduated halvings M ({stages}): the "
                    f"steps are shared by its M + 1 stages")
    if values.get("dist") not in _DIST_LABELS:
        msgs.append(f"noise must be one of {', '.join(_DIST_LABELS)}; got {values.get('dist')!r}")
    return msgs


def smoothed(function: str, x: Any, delta: float, dist: str = "gaussian",
             n_samples: int = 256, seed: int = 0) -> tuple[Any, str]:
    """``f_hat_delta`` at the points ``x`` (shape (..., d)) and how it was computed.

    Exact for Rastrigin (Gaussian noise in any dimension, the ball for d <= 3) and
    Styblinski-Tang (Gaussian); a Monte-Carlo average of ``n_samples`` draws (the same draws
    at every point, so the curve is smooth) otherwise. Returns ``(values, "exact")`` or
    ``(values, "Monte Carlo, n = ...")``.
    """
    import torch

    from labkit import smoothing as S

    if function not in FUNCTIONS:
        raise ValueError(f"function must be one of {', '.join(FUNCTIONS)}; got {function!r}")
    if function == "rastrigin" and (dist == "gaussian" or x.shape[-1] <= 3):
        return S.smoothed_rastrigin(x, delta, dist=dist), "exact"
    if function == "styblinski_tang" and dist == "gaussian":
        return S.smoothed_styblinski_tang(x, delta), "exact"
    gen = torch.Generator().manual_seed(seed)
    f = _functions()[function].f
    return S.smooth(f, x, float(delta), n_samples, dist=dist, generator=gen), \
        f"Monte Carlo, n = {n_samples}"


@dataclass
class Result:
    """What lab 2's panel computed.

    Attributes:
        function, dim, x0: the problem.
        trajectories: ``{"gd": ..., "sgd": ..., "graduated": ...}``
            (:class:`labkit.graduated.Trajectory`; ``points[-1]`` is the final iterate).
        sgd_delta: the smoothing degree implied by the SGD noise, lr * sigma * sqrt(d).
        graduated_deltas: the graduated stages' deltas (the last is 0: plain GD).
        argmin: the global minimizer.
    """

    function: str
    dim: int
    x0: list[float]
    trajectories: dict[str, Any]
    sgd_delta: float
    graduated_deltas: tuple[float, ...]
    argmin: list[float] = field(default_factory=list)


#: Steps computed between two progress reports (and stop checks) of :func:`run`.
CHUNK = 100


def _joined(parts: Sequence[Any], deltas: Sequence[float]) -> Any:
    """One :class:`labkit.graduated.Trajectory` from consecutive pieces (each piece starts
    where the previous one ended)."""
    import torch

    from labkit.graduated import Trajectory

    first, rest = parts[0], parts[1:]
    return Trajectory(torch.cat([first.points, *(p.points[1:] for p in rest)]),
                      torch.cat([first.values, *(p.values[1:] for p in rest)]),
                      torch.cat([first.stages, *(p.stages[1:] for p in rest)]), tuple(deltas))


def run(values: Mapping[str, Any], *, progress: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None) -> Result | None:
    """GD, noisy SGD and graduated optimization from ``x0`` with the panel's knobs.

    Each method gets ``steps`` iterations; graduated optimization shares them among its
    M + 1 stages with deltas delta0, delta0/2, ..., delta0/2^(M-1), 0. The paths are computed
    :data:`CHUNK` steps at a time (the same numbers as in one go): ``progress(text)`` is told
    how far they are, and ``should_stop()`` is polled in between; True ends the computation
    and returns None.

    Raises:
        ValueError: invalid knobs (:func:`validate`'s messages).
    """
    import torch

    from labkit import graduated as G

    msgs = validate(values)
    if msgs:
        raise ValueError("; ".join(msgs))
    spec = _functions()[values["function"]]
    d = values["dim"]
    x0 = torch.tensor(parse_point(values["x0"], d), dtype=torch.float64)
    lr, steps = float(values["lr"]), values["steps"]
    deltas = G.default_deltas(float(values["delta0"]), values["stages"], 0.5, final_zero=True)
    per_stage = steps // len(deltas)
    total, done = 2 * steps + per_stage * len(deltas), 0

    def chunks(name: str, n_steps: int, step: Callable[[Any, int], Any], x: Any) -> list | None:
        nonlocal done
        parts = []
        left = n_steps
        while True:
            if should_stop is not None and should_stop():
                return None
            n = min(CHUNK, left)
            parts.append(step(x, n))
            x, left, done = parts[-1].points[-1], left - n, done + n
            if progress is not None:
                progress(f"computing the paths: {done}/{total} steps ({name})")
            if left == 0:
                return parts

    gd = chunks("GD", steps, lambda x, n: G.gradient_descent(spec.f, x, lr, n), x0)
    if gd is None:
        return None
    gen = torch.Generator().manual_seed(values["seed"])
    noise = float(values["sgd_noise"])
    sgd = chunks("noisy SGD", steps,
                 lambda x, n: G.sgd_noisy(spec.f, x, lr, n, noise, generator=gen), x0)
    if sgd is None:
        return None
    gen = torch.Generator().manual_seed(values["seed"])
    stages, x = [], x0
    for m, dl in enumerate(deltas):
        def stage(x: Any, n: int, dl: float = dl, m: int = m) -> Any:
            t = G.graduated_optimization(spec.f, x, [dl], n, lr, values["n_samples"],
                                         dist=values["dist"], generator=gen)
            t.stages[:] = m
            return t

        parts = chunks(f"graduated, stage {m + 1}/{len(deltas)}", per_stage, stage, x)
        if parts is None:
            return None
        stages += parts
        x = parts[-1].points[-1]
    sgd_t = _joined(sgd, sgd[0].deltas)
    return Result(values["function"], d, x0.tolist(),
                  {"gd": _joined(gd, (0.0,)), "sgd": sgd_t,
                   "graduated": _joined(stages, deltas)},
                  sgd_t.deltas[0], tuple(deltas), [spec.argmin] * d)


def reached(result: Result, tol: float = 0.5) -> dict[str, bool]:
    """Whether each method's final iterate lies within ``tol`` (Euclidean) of the global
    minimizer (0.5 is half the spacing of Rastrigin's local minima)."""
    out = {}
    for name, t in result.trajectories.items():
        final = [float(v) for v in t.points[-1].reshape(-1)]
        dist = math.sqrt(sum((a - b) ** 2 for a, b in zip(final, result.argmin, strict=True)))
        out[name] = dist < tol
    return out


_METHOD_STYLE = {"gd": ("GD", "tab:red"), "sgd": ("noisy SGD", "tab:orange"),
                 "graduated": ("graduated", "tab:green")}


def _figure(values: Mapping[str, Any], result: Result) -> Any:
    import numpy as np
    import torch

    from labkit.widgets import new_figure

    spec = _functions()[values["function"]]
    delta, dist, d = float(values["delta"]), values["dist"], values["dim"]
    n_grid = {"smoke": 301, "short": 601, "paper": 601}[values["profile"]]
    lo, hi = spec.view
    fig = new_figure((11.0, 3.8))
    ax_f, ax_v = fig.subplots(1, 2, width_ratios=[1.3, 1.0])
    if d == 1:
        xs = torch.linspace(lo, hi, n_grid, dtype=torch.float64).unsqueeze(-1)
        fhat, how = smoothed(values["function"], xs, delta, dist, values["n_samples"],
                             values["seed"])
        ax_f.plot(xs[:, 0], spec.f(xs), color="0.55", lw=1, label="f")
        ax_f.plot(xs[:, 0], fhat, color="tab:blue", lw=2, label=f"f̂_δ, δ = {delta:g} ({how})")
        for key, t in result.trajectories.items():
            label, color = _METHOD_STYLE[key]
            pts = t.points[:, 0].numpy()
            ax_f.plot(pts, t.values.numpy(), ".", color=color, ms=2, alpha=0.35)
            ax_f.plot(pts[-1], float(t.values[-1]), "o", color=color, ms=8,
                      markeredgecolor="k", label=f"{label}: x = {pts[-1]:.3f}")
        ax_f.plot(result.x0[0], float(spec.f(torch.tensor(result.x0, dtype=torch.float64))),
                  "k^", ms=8, label="start")
        f_lo, f_hi = float(spec.f(xs).min()), float(spec.f(xs).max())
        pad = 0.08 * (f_hi - f_lo)
        ax_f.set_ylim(f_lo - pad, f_hi + 3 * pad)  # noisy SGD may wander off the view
        ax_f.set_xlabel("x")
        ax_f.set_title("f and f̂_δ; the paths run on f", fontsize="medium")
    else:
        g = torch.linspace(lo, hi, int(math.sqrt(n_grid * 20)), dtype=torch.float64)
        xx, yy = torch.meshgrid(g, g, indexing="xy")
        pts = torch.stack([xx, yy], dim=-1)
        fhat, how = smoothed(values["function"], pts, delta, dist, values["n_samples"],
                             values["seed"])
        cs = ax_f.contourf(xx.numpy(), yy.numpy(), np.asarray(fhat), levels=30, cmap="viridis")
        fig.colorbar(cs, ax=ax_f, label=f"f̂_δ, δ = {delta:g}")
        for key, t in result.trajectories.items():
            label, color = _METHOD_STYLE[key]
            p = t.points.numpy()
            ax_f.plot(p[:, 0], p[:, 1], "-", color=color, lw=1, alpha=0.8)
            ax_f.plot(p[-1, 0], p[-1, 1], "o", color=color, ms=8, markeredgecolor="k",
                      label=f"{label}: ({p[-1, 0]:.2f}, {p[-1, 1]:.2f})")
        ax_f.plot(*result.x0, "w^", ms=8, markeredgecolor="k", label="start")
        ax_f.set_ylim(lo, hi)
        ax_f.set_xlabel("x₁")
        ax_f.set_ylabel("x₂")
        ax_f.set_title(f"f̂_δ ({how}); paths run on f", fontsize="medium")
    ax_f.set_xlim(lo, hi)
    ax_f.legend(fontsize="x-small", loc="upper center")
    for key, t in result.trajectories.items():
        label, color = _METHOD_STYLE[key]
        ax_v.plot(t.values.numpy(), color=color, lw=1, label=label)
    ax_v.set_xlabel("iteration")
    ax_v.set_ylabel("f(x_t)")
    ax_v.set_yscale("symlog", linthresh=1.0)
    ax_v.grid(True, alpha=0.3)
    ax_v.legend(fontsize="small")
    return fig


def _task(values: dict[str, Any], panel: Any) -> Result:
    key = tuple(sorted((k, v) for k, v in values.items() if k != "delta"))
    cache = panel.__dict__.setdefault("_lab2_cache", {})
    result = cache.get(key)
    if result is None:
        panel.set_status("computing the paths...")
        result = run(values, progress=panel.set_status, should_stop=lambda: panel.stop_requested)
        if result is None:
            panel.set_status("stopped: press Run to compute the paths")
            return None
        cache.clear()
        cache[key] = result
    panel.set_status("drawing f and f̂_δ...")
    panel.show(_figure(values, result))
    hits = reached(result)
    panel.set_status(
        f"{FUNCTIONS[result.function][0]} {result.dim}-D from x0 = {values['x0']}: "
        + ", ".join(f"{_METHOD_STYLE[k][0]} {'reached' if r else 'missed'} the global minimum"
                    for k, r in hits.items())
        + f" · SGD noise acts like δ = {result.sgd_delta:.3g}"
    )
    return result


def panel(profile: str | None = None) -> lk_widgets.ControlPanel:
    """Lab 2's panel: f and f_hat_delta, and the three methods' paths on f.

    Moving the δ slider redraws at once (after the running computation, if any); changing
    the function or the dimension resets the start, the learning rate and the SGD noise to that
    function's defaults; after a run, changing the profile runs again once all of its defaults
    are set. The status line tells how far the paths are, and Stop ends their computation.
    """
    panel = lk_widgets.ControlPanel(
        "Lab 2: seeing smoothing (Sato & Iiduka (2024) Fig. 3, Sato & Iiduka (2023))",
        controls=controls(),
        task=_task,
        validate=validate,
        defaults=defaults,
        profile=profile,
        rerun_on_profile=True,
    )
    c = panel.controls

    def on_function(_: Any) -> None:
        spec = _functions()[c["function"].value]
        c["x0"].value = spec.x0[c["dim"].value - 1]
        c["lr"].value = spec.lr
        c["sgd_noise"].value = spec.sgd_noise

    def on_delta(_: Any) -> None:
        if panel.last_result is not None:
            panel.request_run()

    c["function"].observe(on_function, names="value")
    c["dim"].observe(on_function, names="value")
    c["delta"].observe(on_delta, names="value")
    return panel


def delta_table(deltas: Sequence[float] = (0.0, 0.2, 0.4, 0.7, 1.0, 3.0),
                xs: Sequence[float] = (0.0, 0.5, 1.0, 2.0)) -> list[dict[str, Any]]:
    """Closed-form ``f_hat_delta(x)`` of 1-D Rastrigin (Gaussian noise) at a few points.

    One dict per delta: ``{"delta": ..., "values": [f_hat(x) for x in xs], "convex": bool}``
    (convex from the closed-form second derivative, as in Sato & Iiduka (2024) Fig. 3).
    """
    import torch

    from labkit import smoothing as S

    x = torch.tensor(list(xs), dtype=torch.float64).unsqueeze(-1)
    threshold = S.rastrigin_convexity_threshold()
    rows = []
    for dl in deltas:
        vals = S.smoothed_rastrigin(x, float(dl)).tolist()
        rows.append({"delta": float(dl), "values": vals, "convex": dl >= threshold})
    return rows


def paper_figure() -> Any:
    """Sato & Iiduka (2024) Fig. 3 (Rastrigin and its smoothings) and the smallest curvature of
    f_hat_delta against delta, with the convexity threshold and, labelled as the paper's, the
    0.2-1 range of delta that generalized best in Sato & Iiduka's (2024) CIFAR-100 experiments."""
    import matplotlib.pyplot as plt
    import numpy as np

    from labkit import critical
    from labkit import smoothing as S

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    S.plot_rastrigin_smoothing(ax=ax1)
    ax1.set_title("Sato & Iiduka 2024, Fig. 3: f and f̂_δ (Gaussian, closed form)",
                  fontsize="medium")
    deltas = np.linspace(0, 1.5, 301)
    curvature = 2 - 4 * math.pi**2 * 10 * np.exp(-2 * math.pi**2 * deltas**2)
    ax2.plot(deltas, curvature, color="tab:blue", label="min over x of f̂_δ''(x)")
    ax2.axhline(0, color="k", lw=0.8)
    star = S.rastrigin_convexity_threshold()
    ax2.axvline(star, color="tab:red", ls="--", label=f"convex from δ* = {star:.4f}")
    lo, hi = critical.PAPER_VALUES["best_delta_range"]
    ax2.axvspan(lo, hi, color="0.5", alpha=0.15,
                label=f"paper: best δ for ResNet-18/CIFAR-100 ({lo:g}-{hi:g})")
    ax2.set_yscale("symlog", linthresh=1.0)
    ax2.set_xlabel("δ")
    ax2.set_ylabel("smallest curvature")
    ax2.legend(fontsize="x-small")
    ax2.grid(True, alpha=0.3)
    return fig
