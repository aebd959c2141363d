"""The chart: save, restore, size and peak RSS of the main guest, scaling."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .contenders import BY_KEY, DEFAULT, SAVERS
from .guests import MAIN_GUEST


def plot(data: dict[str, Any], summ: dict[str, Any], scal: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summ.get(MAIN_GUEST, {})
    keys = [k for k in SAVERS if k in s]
    labels = [BY_KEY[k].label.replace(" (default)", "\n(default)").replace(" (buffered)", "\n(buffered)")
              .replace("save_image_format=", "") for k in keys]
    colors = ["tab:green" if k.startswith("fastsave") else "tab:gray" for k in keys]
    colors = ["tab:olive" if k == DEFAULT else col for k, col in zip(keys, colors)]
    fig, axes = plt.subplots(3, 2, figsize=(14, 15))
    title = data["guests"].get(MAIN_GUEST, {}).get("label", MAIN_GUEST)

    def bars(ax: Any, field: str, scale: float, ylabel: str, limit: tuple[str, str] | None) -> None:
        vals = [(s[k].get(field) or 0) * scale for k in keys]
        lo = [v - (s[k].get(field + "_min") or 0) * scale if s[k].get(field + "_min") is not None else 0
              for k, v in zip(keys, vals)]
        hi = [(s[k].get(field + "_max") or 0) * scale - v if s[k].get(field + "_max") is not None else 0
              for k, v in zip(keys, vals)]
        ax.bar(range(len(keys)), vals, color=colors, yerr=[lo, hi], capsize=3)
        ranked = sorted(vals)
        top = None
        if len(ranked) > 2 and ranked[-2] > 0 and ranked[-1] > 3 * ranked[-2]:
            top = ranked[-2] * 1.6  # one outlier (gzip) would flatten the rest: clip it
            ax.set_ylim(0, top)
        for i, v in enumerate(vals):
            txt = f"{v:.2f}" if v < 100 else f"{v:.0f}"
            if top is not None and v > top:
                ax.text(i, top * 0.97, txt + " (clipped)", ha="center", va="top", fontsize=7,
                        rotation=90, color="white")
            else:
                ax.text(i, v, txt, ha="center", va="bottom", fontsize=7)
        if limit and limit[0] in s and s[limit[0]].get(field) is not None:
            lv = s[limit[0]][field] * scale
            ax.axhline(lv, color="tab:red", linestyle="--", linewidth=1)
            ax.text(len(keys) - 0.5, lv, limit[1], color="tab:red", ha="right", va="bottom", fontsize=8)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)

    bars(axes[0][0], "save_s", 1, "save s (median, range)", ("limit-producer", "producer limit"))
    axes[0][0].set_title(f"save time - {title}", fontsize=9)
    bars(axes[0][1], "restore_s", 1, "restore s (median, range)", ("limit-consumer", "consumer limit"))
    axes[0][1].set_title("restore time", fontsize=9)
    bars(axes[1][0], "image_bytes", 1e-6, "image MB", None)
    axes[1][0].set_title("image size", fontsize=9)
    vals = [(s[k].get("helper_rss_kib") or 0) / 1024 for k in keys]
    inproc = [(s[k].get("inproc_hwm_growth_kib") or 0) / 1024 for k in keys]
    ax = axes[1][1]
    ax.bar(range(len(keys)), vals, color=colors, label="saving helper process VmHWM")
    ax.bar(range(len(keys)), inproc, bottom=vals, color="tab:blue", alpha=0.4,
           label="in-process VmHWM growth (libvirt embedded / fastsave caller)")
    ax.axhline(128, color="tab:red", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("MiB")
    ax.set_title("peak RSS of the saving process(es)", fontsize=9)
    ax.legend(fontsize=7)
    rows = [r for r in scal["rows"]]
    mixed = [r for r in rows if r["fill_mib"]]
    ax = axes[2][0]
    for key, lab, col in (("fs_save_s", "fastsave default", "tab:olive"),
                          ("lv_save_s", "libvirt BYPASS_CACHE", "tab:gray"),
                          ("producer_s", "producer limit", "tab:red")):
        pts = [(r["mem_gib"], r[key]) for r in mixed if r[key] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", color=col, label=lab)
        idle = [(r["mem_gib"], r[key]) for r in rows if not r["fill_mib"] and r[key] is not None]
        if idle:
            ax.plot(*zip(*idle), marker="x", linestyle="none", color=col)
    ax.set_xlabel("guest RAM GiB (x: idle guest)")
    ax.set_ylabel("save s")
    ax.set_title("scaling: save time", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[2][1]
    for key, lab, col in (("fs_rss_kib", "fastsave engine child", "tab:olive"),
                          ("lv_rss_kib", "libvirt iohelper", "tab:gray")):
        pts = [(r["mem_gib"], r[key] / 1024) for r in mixed if r[key]]
        if pts:
            ax.plot(*zip(*pts), marker="o", color=col, label=lab)
    ax.axhline(128, color="tab:red", linestyle="--", linewidth=1, label="128 MiB target")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("guest RAM GiB")
    ax.set_ylabel("peak RSS MiB")
    ax.set_title("scaling: peak RSS of the saving process", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
