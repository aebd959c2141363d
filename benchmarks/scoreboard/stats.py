"""From the rounds to numbers: phases of each round, medians per guest and
contender, the scaling with guest size, ratios and the target checks."""
from __future__ import annotations

import statistics
from typing import Any

from .contenders import BASE, BY_KEY, CONTENDERS, DEFAULT, RAW, SAVER_KINDS
from .guests import MAIN_GUEST


def helper_rss_kib(rec: dict[str, Any]) -> int:
    w = rec.get("save_watch") or {}
    return max((h["hwm_kib"] for h in w.get("helpers", [])), default=0)


def helper_tags(rec: dict[str, Any]) -> str:
    w = rec.get("save_watch") or {}
    tags = []
    for h in w.get("helpers", []):
        short = {"fastsave.worker": "engine", "libvirt_iohelper": "iohelper"}.get(h["tag"], h["tag"])
        if short not in tags:
            tags.append(short)
    return "+".join(tags)


# How runs from before fastsave.trace recorded each boundary (wrapped QMP and
# libvirt calls): (what, detail, last), so their saved JSON still reports.
OLD_EVENTS = {
    "save.migrating": ("migrate", None, False),
    "save.streamed": ("query-migrate", "completed", False),
    "save.committed": ("destroy:start", None, True),
    "save.stopped": ("destroy:end", None, True),
    "restore.qemu-starting": ("createXML:start", None, False),
    "restore.qemu-started": ("createXML:end", None, False),
    "restore.incoming": ("migrate-incoming", None, False),
    "restore.streamed": ("query-migrate", "completed", False),
}


def _event(rec: dict[str, Any], key: str, what: str, detail: Any = None,
           last: bool = False) -> float | None:
    hits = [t for t, w, d in rec.get(key, []) if w == what and (detail is None or d == detail)]
    if not hits:
        return None
    return hits[-1] if last else hits[0]


def _at(rec: dict[str, Any], key: str, event: str) -> float | None:
    """When a fastsave.trace event happened in the round (seconds from the
    call), from the event or its older equivalent; None if not recorded."""
    t = _event(rec, key, event)
    if t is None and event in OLD_EVENTS:
        what, detail, last = OLD_EVENTS[event]
        t = _event(rec, key, what, detail, last)
    return t


def _span(a: float | None, b: float | None) -> float | None:
    return b - a if a is not None and b is not None else None


def phases(rec: dict[str, Any]) -> dict[str, float | None]:
    """Where a round's time went (seconds; None when not observable)."""
    c = BY_KEY[rec["contender"]]
    out: dict[str, float | None] = {}
    if c.kind == "producer":
        out.update(prepare=rec["prepare_s"], stream=rec["stream_s"], durable=rec["data_done_s"],
                   teardown=rec["save_s"] - rec["data_done_s"], destroy=rec["destroy_s"])
    elif c.kind == "consumer":
        out.update(r_qemu_start=rec["qemu_start_s"], r_stream=rec["stream_s"],
                   r_after=rec["resume_s"])
    elif c.kind in SAVER_KINDS:
        sw = rec.get("save_watch") or {}
        gone = [h["gone"] for h in sw.get("helpers", []) if h["gone"] is not None]
        durable = max(gone) if gone else None
        if c.kind == "fastsave":
            mig = _at(rec, "save_events", "save.migrating")
            out.update(prepare=mig, stream=_span(mig, _at(rec, "save_events", "save.streamed")),
                       destroy=_span(_at(rec, "save_events", "save.committed"),
                                     _at(rec, "save_events", "save.stopped")))
        out["durable"] = durable
        out["teardown"] = (rec.get("save_returned_s", rec["save_s"]) - durable
                           if durable is not None else None)
        out["sync"] = rec.get("save_sync_s")
        rw = rec.get("restore_watch") or {}
        rgone = [h["gone"] for h in rw.get("helpers", []) if h["gone"] is not None]
        if c.kind == "fastsave":
            done = _at(rec, "restore_events", "restore.streamed")
            out.update(r_qemu_start=_span(_at(rec, "restore_events", "restore.qemu-starting"),
                                          _at(rec, "restore_events", "restore.qemu-started")),
                       r_stream=_span(_at(rec, "restore_events", "restore.incoming"), done),
                       r_after=rec["restore_s"] - done if done is not None else None)
        out["r_read"] = max(rgone) if rgone else None
    if "save_watch" in rec:
        w = rec["save_watch"]
        if w.get("qemu_exiting") is not None and w.get("qemu_gone") is not None:
            out["qemu_exit"] = w["qemu_gone"] - w["qemu_exiting"]
    return out


def med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(data: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """{guest: {contender: medians and counts}} over the rounds that succeeded."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for gkey in data["guests"]:
        out[gkey] = {}
        for c in CONTENDERS:
            recs = [r for r in data["rounds"] if r["guest"] == gkey and r["contender"] == c.key]
            if not recs:
                continue
            good = [r for r in recs if r.get("ok")]
            s: dict[str, Any] = {"rounds": len(recs), "failures": len(recs) - len(good),
                                 "errors": [r.get("error") for r in recs if not r.get("ok")]}
            for k in ("busy_save", "busy_restore"):
                s[k] = med([r.get(k) for r in good])
            for k in ("save_s", "restore_s", "image_bytes", "stream_bytes", "save_returned_s",
                      "save_sync_s", "image_apparent_bytes"):
                s[k] = med([r.get(k) for r in good])
                vals = [r[k] for r in good if r.get(k) is not None]
                if vals:
                    s[k + "_min"], s[k + "_max"] = min(vals), max(vals)
            rss = [helper_rss_kib(r) for r in good if helper_rss_kib(r)]
            s["helper_rss_kib"] = max(rss) if rss else None
            s["helper_tags"] = helper_tags(good[0]) if good else ""
            s["inproc_hwm_growth_kib"] = med([r.get("inproc_hwm_growth_kib") for r in good])
            ph = [phases(r) for r in good]
            s["phases"] = {k: med([p.get(k) for p in ph]) for k in sorted({k for p in ph for k in p})}
            for which in ("save_stats", "restore_stats"):
                st = [r[which] for r in good if which in r]
                if st:
                    s[which] = {k: med([x[k] for x in st]) for k in st[0]
                                if isinstance(st[0][k], (int, float)) and not isinstance(st[0][k], bool)}
                    s[which]["direct"] = st[0].get("direct")
                    s[which]["spliced"] = st[0].get("spliced")
            out[gkey][c.key] = s
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def check(label: str, value: float | None, limit: float, strict: bool = False) -> dict[str, Any]:
    if value is None:
        return {"label": label, "status": "SKIP", "line": f"SKIP {label}: no data"}
    ok = value < limit if strict else value <= limit
    margin = 1 - value / limit
    op = "<" if strict else "<="
    status = "PASS" if ok else "MISS"
    return {"label": label, "status": status, "value": value, "limit": limit, "margin": margin,
            "line": f"{status} {label}: {value:.3f} (target {op} {limit:g}, margin {margin:+.1%})"}


def fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares line (slope, intercept)."""
    if len(points) < 2:
        return None
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return slope, my - slope * mx


def scaling(data: dict[str, Any], summ: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for gkey, g in data["guests"].items():
        s = summ[gkey]
        rows.append({
            "guest": gkey, "mem_gib": g["mem_mib"] / 1024, "fill_mib": g["fill_mib"],
            "stream_bytes": (s.get("limit-producer") or {}).get("stream_bytes"),
            "fs_save_s": (s.get(DEFAULT) or {}).get("save_s"),
            "fs_rss_kib": (s.get(DEFAULT) or {}).get("helper_rss_kib"),
            "lv_save_s": (s.get(BASE) or {}).get("save_s"),
            "lv_rss_kib": (s.get(BASE) or {}).get("helper_rss_kib"),
            "lv_inproc_kib": (s.get(BASE) or {}).get("inproc_hwm_growth_kib"),
            "producer_s": (s.get("limit-producer") or {}).get("save_s"),
        })
    mixed = [r for r in rows if r["fill_mib"]]

    def slope(key: str, scale: float = 1.0) -> float | None:
        f = fit([(r["mem_gib"], r[key] * scale) for r in mixed if r[key] is not None])
        return None if f is None else f[0]

    slopes = {"fs_save_s": slope("fs_save_s"), "fs_rss_mib": slope("fs_rss_kib", 1 / 1024),
              "lv_save_s": slope("lv_save_s"), "lv_rss_mib": slope("lv_rss_kib", 1 / 1024),
              "producer_s": slope("producer_s")}
    return {"rows": rows, "slopes": slopes}


def targets(summ: dict[str, Any], scal: dict[str, Any]) -> list[dict[str, Any]]:
    s = summ.get(MAIN_GUEST, {})

    def get(key: str, field: str) -> float | None:
        return (s.get(key) or {}).get(field)

    out = [
        check("1.5 GiB: fastsave default save time / libvirt BYPASS_CACHE save time",
              ratio(get(DEFAULT, "save_s"), get(BASE, "save_s")), 0.6),
        check("1.5 GiB: fastsave default image / libvirt raw image",
              ratio(get(DEFAULT, "image_bytes"), get(RAW, "image_bytes")), 0.85),
        check("1.5 GiB: fastsave zstd+direct save time / libvirt BYPASS_CACHE save time",
              ratio(get("fastsave-zstd-direct", "save_s"), get(BASE, "save_s")), 1.0),
        check("1.5 GiB: fastsave zstd (buffered) save time / libvirt BYPASS_CACHE save time",
              ratio(get("fastsave-zstd", "save_s"), get(BASE, "save_s")), 1.0),
        check("1.5 GiB: fastsave zstd image / libvirt raw image",
              ratio(get("fastsave-zstd-direct", "image_bytes"), get(RAW, "image_bytes")), 0.5),
        check("1.5 GiB: fastsave zstd image / libvirt lzop image",
              ratio(get("fastsave-zstd-direct", "image_bytes"), get("libvirt-lzop", "image_bytes")),
              1.0, strict=True),
        check("1.5 GiB: fastsave default restore time / libvirt start from its raw image",
              ratio(get(DEFAULT, "restore_s"), get(RAW, "restore_s")), 0.6),
    ]
    rss = [r["fs_rss_kib"] / 1024 for r in scal["rows"] if r["fs_rss_kib"]]
    out.append(check("all guests: fastsave default saving process peak RSS, MiB (max)",
                     max(rss) if rss else None, 128))
    # across sizes of the same content; the idle guest's 12 MB stream never fills the ring
    rss = [r["fs_rss_kib"] / 1024 for r in scal["rows"] if r["fs_rss_kib"] and r["fill_mib"]]
    out.append(check("mixed guests: fastsave default peak RSS spread across sizes, MiB (max - min)",
                     (max(rss) - min(rss)) if len(rss) > 1 else None, 8))
    out.append(check("1.5 GiB: fastsave auto (default) save time / producer limit",
                     ratio(get(DEFAULT, "save_s"), get("limit-producer", "save_s")), 1.2))
    return out
