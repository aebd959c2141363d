"""From the rounds to numbers: phases of each round, medians per guest and
contender, the scaling with guest size, ratios and the target checks."""
from __future__ import annotations

import statistics
from typing import Any

from .contenders import BASE, BY_KEY, CONTENDERS, DEFAULT, RAW, SAVER_KINDS, ZSTD_DEFAULT
from .guests import MAIN_GUEST

from fastsave.channels import auto_count


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
                      "save_sync_s", "image_apparent_bytes", "image_streams"):
                s[k] = med([r.get(k) for r in good])
                vals = [r[k] for r in good if r.get(k) is not None]
                if vals:
                    s[k + "_min"], s[k + "_max"] = min(vals), max(vals)
            rss = [helper_rss_kib(r) for r in good if helper_rss_kib(r)]
            s["helper_rss_kib"] = max(rss) if rss else None
            s["helper_tags"] = helper_tags(good[0]) if good else ""
            s["inproc_hwm_growth_kib"] = med([r.get("inproc_hwm_growth_kib") for r in good])
            s["channel_stream_bytes"] = next((r["channel_stream_bytes"] for r in good
                                              if r.get("channel_stream_bytes")), None)
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
        return {"label": label, "status": "SKIP", "limit": limit, "line": f"SKIP {label}: no data"}
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


LIBVIRT_KINDS = ("libvirt", "libvirt-params")
LIBVIRT_COMPRESSED = ("libvirt-zstd", "libvirt-lzop", "libvirt-gzip")
# the save phases that say where a save's time goes, in the order they happen
SAVE_PHASES = (("prepare", "prepare"), ("stream", "QEMU stream"), ("durable", "data durable at"),
               ("teardown", "after durable"), ("destroy", "of which destroy"),
               ("sync", "fdatasync after return"))
RESTORE_PHASES = (("r_qemu_start", "QEMU start"), ("r_stream", "stream in"),
                  ("r_read", "helper done at"), ("r_after", "after stream"))


def default_channels(data: dict[str, Any]) -> int | None:
    """fastsave's default channel count in this run (None: chosen per save;
    runs from before channels existed: 1)."""
    return data.get("meta", {}).get("fastsave_default_channels", 1)


def streams_to_channels(streams: float | None) -> int | None:
    """An image's streams -> the channel count it was saved with (N multifd
    channels = N + 1 streams; one stream = one channel)."""
    if streams is None:
        return None
    return 1 if streams <= 1 else int(round(streams)) - 1


def zstd_key(summ_g: dict[str, Any]) -> str:
    """fastsave's zstd row with its default I/O (older runs: zstd+direct)."""
    old = "fastsave-zstd-direct"
    return old if old in summ_g and ZSTD_DEFAULT not in summ_g else ZSTD_DEFAULT


def channel_rows(data: dict[str, Any], summ_g: dict[str, Any], mode: str) -> dict[int, str]:
    """{channel count: contender} of fastsave's `mode` rows with its default
    I/O; the default row stands for the default channel count (or for the
    count its images show, when fastsave chooses per save)."""
    dch = default_channels(data)
    default_key = DEFAULT if mode == "auto" else zstd_key(summ_g)
    out: dict[int, str] = {}
    for key, s in summ_g.items():
        c = BY_KEY[key]
        if c.kind != "fastsave" or c.params.get("mode") != mode:
            continue
        if key == default_key:
            n = dch or streams_to_channels(s.get("image_streams"))
        elif "direct" in c.params or "channels" not in c.params:
            continue
        else:
            n = c.params["channels"]
        if n is not None:
            out.setdefault(n, key)
    return dict(sorted(out.items()))


def target_guest(data: dict[str, Any], summ: dict[str, Any]) -> str | None:
    """The guest the targets are checked on: the 1.5 GiB one, else the
    largest guest with guest-like data that this run had."""
    if MAIN_GUEST in summ:
        return MAIN_GUEST
    mixed = [k for k, g in data["guests"].items() if g["fill_mib"] and k in summ]
    return max(mixed, key=lambda k: data["guests"][k]["mem_mib"]) if mixed else None


def _fmt_phases(label: str, s: dict[str, Any], which: tuple[tuple[str, str], ...],
                total: str) -> str:
    p = s.get("phases") or {}
    parts = [f"{name} {p[k]:.2f}" for k, name in which if p.get(k) is not None]
    return f"{label} {f2s(s.get(total))} s" + (f" ({', '.join(parts)})" if parts else
                                               " (no phase boundaries recorded)")


def f2s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _why_time(key: str, ref: str, s: dict[str, Any], limit: float, total: str,
              which: tuple[tuple[str, str], ...]) -> str:
    """Where the time went, for a time target that was missed."""
    a, b = s.get(key) or {}, s.get(ref) or {}
    need = (b.get(total) or 0) * limit
    over = (a.get(total) or 0) - need
    line = (f"where the time goes: needs <= {need:.2f} s, {over:.2f} s over; " + _fmt_phases(BY_KEY[key].label, a, which, total)
            + "; " + _fmt_phases(BY_KEY[ref].label, b, which, total))
    pa, pb = a.get("phases") or {}, b.get("phases") or {}
    if total == "save_s" and pa.get("durable") is not None and pb.get("durable") is not None:
        line += (f"; data durable {pa['durable'] - pb['durable']:+.2f} s against it, the rest "
                 f"(stop, sync) {(a[total] - pa['durable']) - (b[total] - pb['durable']):+.2f} s")
    if total == "save_s" and a.get("stream_bytes") and pa.get("stream"):
        line += f"; QEMU's stream ran at {a['stream_bytes'] / pa['stream'] / 1e6:.0f} MB/s"
    return line


def _why_size(key: str, ref: str, s: dict[str, Any], limit: float) -> str:
    a, b = s.get(key) or {}, s.get(ref) or {}
    st = a.get("save_stats") or {}
    # QEMU's stream: from fastsave's image, else the producer limit's or libvirt's raw image
    sb = (a.get("stream_bytes") or (s.get("limit-producer") or {}).get("stream_bytes")
          or (s.get(RAW) or {}).get("image_bytes"))
    line = (f"where the bytes go: needs <= {(b.get('image_bytes') or 0) * limit / 1e6:.0f} MB: "
            f"{BY_KEY[key].label} wrote "
            f"{(a.get('image_bytes') or 0) / 1e6:.0f} MB of a {(sb or 0) / 1e6:.0f} MB "
            f"stream ({ratio(a.get('image_bytes'), sb) or 0:.3f} of it)")
    if st.get("chunks_compressed") is not None:
        line += (f"; chunks compressed/stored {st['chunks_compressed']:.0f}/"
                 f"{st.get('chunks_stored', 0):.0f}")
    return line


def _fastest(s: dict[str, Any], keys: list[str], field: str) -> str | None:
    have = [k for k in keys if (s.get(k) or {}).get(field) is not None]
    return min(have, key=lambda k: s[k][field]) if have else None


def targets(summ: dict[str, Any], scal: dict[str, Any],
            data: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The targets of one stack (checked on target_guest): fastsave's default
    save <= 0.7x libvirt's fastest save of any format or channel count, with
    an image <= 0.85x libvirt's raw one; fastsave zstd's save <= 0.5x libvirt
    zstd's (or, where libvirt has no zstd format, its fastest compressed
    format's) with an image no larger; fastsave's default restore <= 0.7x
    libvirt's fastest restore of its own image; the engine's peak RSS flat
    in guest size. A MISS carries `why`: where the time (or size) went."""
    data = data or {"guests": {k: {"fill_mib": 1, "mem_mib": 0} for k in summ}, "meta": {}}
    gkey = target_guest(data, summ)
    s = summ.get(gkey, {}) if gkey else {}
    gname = f"{data['guests'][gkey]['mem_mib'] / 1024:g} GiB" if gkey else "no guest"

    def get(key: str | None, field: str) -> float | None:
        return (s.get(key) or {}).get(field) if key else None

    def label(key: str | None) -> str:
        return BY_KEY[key].label if key else "none ran"

    libvirts = [c.key for c in CONTENDERS if c.kind in LIBVIRT_KINDS and c.key in s]
    out = []
    lv_save = _fastest(s, libvirts, "save_s")
    t = check(f"{gname}: fastsave default save / libvirt's fastest save ({label(lv_save)})",
              ratio(get(DEFAULT, "save_s"), get(lv_save, "save_s")), 0.7)
    t.update(role="save_auto", ref_s=get(lv_save, "save_s"))
    if t["status"] == "MISS":
        t["why"] = _why_time(DEFAULT, lv_save, s, 0.7, "save_s", SAVE_PHASES)
    out.append(t)
    t = check(f"{gname}: fastsave default image / libvirt raw image",
              ratio(get(DEFAULT, "image_bytes"), get(RAW, "image_bytes")), 0.85)
    if t["status"] == "MISS":
        t["why"] = _why_size(DEFAULT, RAW, s, 0.85)
    out.append(t)

    zk = zstd_key(s)
    if "libvirt-zstd" in s:
        lz, note = "libvirt-zstd", ""
    else:
        lz = _fastest(s, [k for k in LIBVIRT_COMPRESSED if k in s], "save_s")
        note = ("; libvirt has no zstd format here: against its fastest compressed format"
                if lz else "")
    t = check(f"{gname}: {label(zk)} save / {label(lz)} save{note}",
              ratio(get(zk, "save_s"), get(lz, "save_s")), 0.5)
    t.update(role="save_zstd", ref_s=get(lz, "save_s"))
    if t["status"] == "MISS":
        t["why"] = _why_time(zk, lz, s, 0.5, "save_s", SAVE_PHASES)
    out.append(t)
    t = check(f"{gname}: {label(zk)} image / {label(lz)} image",
              ratio(get(zk, "image_bytes"), get(lz, "image_bytes")), 1.0)
    if t["status"] == "MISS":
        t["why"] = _why_size(zk, lz, s, 1.0)
    out.append(t)

    lv_restore = _fastest(s, libvirts, "restore_s")
    t = check(f"{gname}: fastsave default restore / libvirt's fastest restore of its own image "
              f"({label(lv_restore)})",
              ratio(get(DEFAULT, "restore_s"), get(lv_restore, "restore_s")), 0.7)
    t.update(role="restore", ref_s=get(lv_restore, "restore_s"))
    if t["status"] == "MISS":
        t["why"] = _why_time(DEFAULT, lv_restore, s, 0.7, "restore_s", RESTORE_PHASES)
    out.append(t)

    # peak RSS flat in guest size: the engine's peak across the guests with
    # guest-like data (the idle guest's small stream never fills the ring)
    for key in (DEFAULT, zk):
        pts = [(g, (summ[g].get(key) or {}).get("helper_rss_kib")) for g in summ
               if data["guests"].get(g, {}).get("fill_mib")]
        pts = [(g, v / 1024) for g, v in pts if v]
        t = check(f"guests with data: {label(key)} engine peak RSS spread across guest sizes, "
                  "MiB (max - min)",
                  (max(v for _, v in pts) - min(v for _, v in pts)) if len(pts) > 1 else None, 8)
        if t["status"] == "SKIP":
            t["line"] += " (needs two or more guest sizes: --guests mixed-512,mixed-1536)"
        elif t["status"] == "MISS":
            t["why"] = "peak RSS by guest: " + ", ".join(f"{g} {v:.1f} MiB" for g, v in pts)
        out.append(t)
    rss = [r["fs_rss_kib"] / 1024 for r in scal["rows"] if r["fs_rss_kib"]]
    out.append(check("all guests: fastsave default engine peak RSS, MiB (max)",
                     max(rss) if rss else None, 128))
    t = check(f"{gname}: fastsave default save / producer limit (QEMU's single stream, then stop)",
              ratio(get(DEFAULT, "save_s"), get("limit-producer", "save_s")), 1.2)
    if t["status"] == "MISS":
        t["why"] = _why_time(DEFAULT, "limit-producer", s, 1.2, "save_s", SAVE_PHASES)
    out.append(t)
    return out


def _window(s: dict[str, Any], save: bool) -> tuple[float | None, str]:
    """The stream's time of a fastsave row: QEMU's migration (trace hook),
    else from the call until the engine child was done."""
    p = s.get("phases") or {}
    if save:
        return (p["stream"], "QEMU stream") if p.get("stream") else (p.get("durable"), "to durable")
    return (p["r_stream"], "stream in") if p.get("r_stream") else (p.get("r_read"), "to engine done")


# Projection assumptions (stated in the report with the table)
CORE_COUNTS = (16, 64)
MEM_THREADS_MAX = 8   # memory copy bandwidth taken to grow with threads up to this many
COPIES_PER_BYTE = 3   # guest RAM -> socket -> engine -> page cache / disk buffer


def channel_scaling(data: dict[str, Any], summ: dict[str, Any]) -> dict[str, Any]:
    """Per-channel stream throughput of fastsave's 1, 2, 4 channel rows (each
    mode, each guest), and a projection of the save and restore throughput for
    hosts with more cores (CORE_COUNTS), from this run's own figures."""
    rows: list[dict[str, Any]] = []
    for gkey in data["guests"]:
        sg = summ.get(gkey) or {}
        for mode in ("auto", "zstd"):
            chans = channel_rows(data, sg, mode)
            base_save = base_restore = None
            for n, key in chans.items():
                s = sg[key]
                sb = s.get("stream_bytes")
                ws, ws_src = _window(s, True)
                wr, wr_src = _window(s, False)
                tot_s = sb / ws / 1e6 if sb and ws else None
                tot_r = sb / wr / 1e6 if sb and wr else None
                if n == 1:
                    base_save, base_restore = tot_s, tot_r
                cpus = data["meta"].get("cpus") or 1
                rows.append({
                    "guest": gkey, "mode": mode, "channels": n, "key": key,
                    "default": key in (DEFAULT, ZSTD_DEFAULT),
                    "image_streams": s.get("image_streams"), "stream_bytes": sb,
                    "image_bytes": s.get("image_bytes"),
                    "channel_stream_bytes": s.get("channel_stream_bytes"),
                    "save_s": s.get("save_s"), "restore_s": s.get("restore_s"),
                    "save_window_s": ws, "save_window": ws_src,
                    "restore_window_s": wr, "restore_window": wr_src,
                    "save_mb_s": tot_s, "save_mb_s_per_channel": tot_s / n if tot_s else None,
                    "restore_mb_s": tot_r,
                    "restore_mb_s_per_channel": tot_r / n if tot_r else None,
                    "save_speedup": ratio(tot_s, base_save), "restore_speedup": ratio(tot_r, base_restore),
                    "save_cpu_s_per_mb": (s["busy_save"] * cpus * s["save_s"] / (sb / 1e6)
                                          if s.get("busy_save") and s.get("save_s") and sb else None),
                    "restore_cpu_s_per_mb": (s["busy_restore"] * cpus * s["restore_s"] / (sb / 1e6)
                                             if s.get("busy_restore") and s.get("restore_s") and sb
                                             else None),
                })
    return {"rows": rows, "projection": project(data, summ, rows)}


def project(data: dict[str, Any], summ: dict[str, Any], rows: list[dict[str, Any]]
            ) -> list[dict[str, Any]]:
    """Projected stream throughput on CORE_COUNTS cores, per mode and
    direction, from the target guest's 1-channel row:

        MB/s = min(channels x MB/s of one channel,      channels = fastsave's choice
                   cores / CPU s per MB,                 all processes, measured
                   this machine's disk x stream / image,
                   memory copy x min(cores, 8) / 3)

    A projection, not a measurement (the report says so, with these terms)."""
    gkey = target_guest(data, summ)
    meta = data["meta"]
    disk = meta.get("disk") or {}
    mem = meta.get("mem_copy_mb_s")
    out = []
    for mode in ("auto", "zstd"):
        one = next((r for r in rows if r["guest"] == gkey and r["mode"] == mode and r["channels"] == 1),
                   None)
        if one is None:
            continue
        shrink = ratio(one["stream_bytes"], one["image_bytes"]) or 1.0
        for op, disk_key in (("save", "write_mb_s"), ("restore", "read_mb_s")):
            per_ch, cpu = one[f"{op}_mb_s_per_channel"], one[f"{op}_cpu_s_per_mb"]
            if not per_ch:
                continue
            for cores in CORE_COUNTS:
                ch = auto_count(cores)  # what a save on such a host gets by default
                bounds = {"channels": ch * per_ch}
                if cpu:
                    bounds["CPU"] = cores / cpu
                if disk.get(disk_key):
                    bounds["disk"] = disk[disk_key] * shrink
                if mem:
                    bounds["memory"] = mem * min(cores, MEM_THREADS_MAX) / COPIES_PER_BYTE
                limit = min(bounds, key=lambda k: bounds[k])
                mb_s = bounds[limit]
                out.append({"mode": mode, "op": op, "cores": cores, "channels": ch,
                            "per_channel_mb_s": per_ch, "bounds": bounds, "mb_s": mb_s,
                            "bound_by": limit, "s_per_gib_stream": (1 << 30) / 1e6 / mb_s,
                            "guest": gkey})
    return out
