"""``curves.png`` of an RFT run folder (``unidg train rft``): held-out reward, rollout reward and KL per step."""

from __future__ import annotations

import json
from pathlib import Path

from unidg.core.errors import UniDGError


def plot_rft_log(log_path: str | Path, out: str | Path) -> Path | None:
    """A PNG of an RFT log: the held-out reward at its evaluation steps, the rollouts' mean reward and the KL to the SFT
    policy per step. Returns its path, or None (with a line on stdout) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("curves.png skipped: matplotlib is not installed (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    if not records:
        raise UniDGError(f"{log_path} holds no records: run `unidg train rft` first")
    evaluated = [(r["step"], r["heldout_reward"]) for r in records if "heldout_reward" in r]
    trained = [r for r in records if "reward_mean" in r]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if evaluated:
        axes[0].plot(*zip(*evaluated), "o-", color="tab:green")
    axes[0].set(title="held-out mean reward (ODE samples)", xlabel="RFT step")
    axes[1].plot([r["step"] for r in trained], [r["reward_mean"] for r in trained], ".-", color="tab:blue")
    axes[1].set(title="rollout mean reward", xlabel="RFT step")
    axes[2].plot([r["step"] for r in trained], [r["kl"] for r in trained], ".-", color="tab:red")
    axes[2].set(title="KL to the SFT policy (per element)", xlabel="RFT step")
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    out = Path(out)
    partial = out.with_name(f".{out.name}.partial.png")
    figure.savefig(partial, dpi=100)
    plt.close(figure)
    partial.replace(out)
    return out
