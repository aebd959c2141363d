"""The report: tables, the time breakdown, PASS/MISS lines, floors, and
the README block."""
from __future__ import annotations

from typing import Any

from .contenders import BASE, BY_KEY, CONTENDERS, DEFAULT, RAW, ZSTD_DEFAULT
from .guests import MAIN_GUEST
from .stats import (COPIES_PER_BYTE, MEM_THREADS_MAX, default_channels, ratio,
                    streams_to_channels)

# suffixes for the rows that are fastsave's defaults ("[default: 2 ch]"), set by render
MARKS: dict[str, str] = {}


def label(key: str) -> str:
    return BY_KEY[key].label + MARKS.get(key, "")


def f2(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _range(s: dict[str, Any], key: str) -> str:
    """" [min-max]" when there were several rounds."""
    if s.get(key + "_min") is None or s["rounds"] <= 1:
        return ""
    return f" [{s[key + '_min']:.2f}-{s[key + '_max']:.2f}]"


def contender_table(summ_g: dict[str, Any]) -> list[str]:
    base, raw = summ_g.get(BASE, {}), summ_g.get(RAW, {})
    out = ["| contender | save s | x bypass | call returned at s | restore s | x bypass | image MB | x raw "
           "| saving helper peak RSS MiB | in-process VmHWM growth MiB | machine CPU busy % save/restore "
           "| ok/attempts |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in CONTENDERS:
        s = summ_g.get(c.key)
        if s is None:
            continue
        size = s.get("image_bytes") or s.get("stream_bytes")
        size_txt = f2(size / 1e6 if size else None, ".0f")
        if c.kind in ("producer", "consumer") and size:
            size_txt = f"({size_txt} stream)"
        if s.get("image_apparent_bytes"):
            size_txt += f" (sparse; {s['image_apparent_bytes'] / 1e6:.0f} long)"
        rss = s.get("helper_rss_kib")
        rss_txt = f"{rss / 1024:.1f} ({s['helper_tags']})" if rss else "-"
        inproc = s.get("inproc_hwm_growth_kib")
        spread, rspread = _range(s, "save_s"), _range(s, "restore_s")
        out.append(
            f"| {label(c.key)} | {f2(s.get('save_s'))}{spread} | {f2(ratio(s.get('save_s'), base.get('save_s')))} "
            f"| {f2(s.get('save_returned_s') if c.kind.startswith('libvirt') else None)} "
            f"| {f2(s.get('restore_s'))}{rspread} | {f2(ratio(s.get('restore_s'), base.get('restore_s')))} "
            f"| {size_txt} | {f2(ratio(s.get('image_bytes'), raw.get('image_bytes')), '.3f')} "
            f"| {rss_txt} | {f2(inproc / 1024 if inproc is not None else None, '.1f')} "
            f"| {f2(s['busy_save'] * 100 if s.get('busy_save') is not None else None, '.0f')}/"
            f"{f2(s['busy_restore'] * 100 if s.get('busy_restore') is not None else None, '.0f')} "
            f"| {s['rounds'] - s['failures']}/{s['rounds']} |")
    return out


def phase_table(summ_g: dict[str, Any]) -> list[str]:
    out = ["| contender | save s | prepare | QEMU stream | data durable at | after durable "
           "| of which destroy | QEMU exit | fdatasync after return | restore s | QEMU start | stream in "
           "| helper done at | after stream |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in CONTENDERS:
        s = summ_g.get(c.key)
        if s is None:
            continue
        p = s.get("phases", {})
        out.append(
            f"| {label(c.key)} | {f2(s.get('save_s'))} | {f2(p.get('prepare'))} | {f2(p.get('stream'))} "
            f"| {f2(p.get('durable'))} | {f2(p.get('teardown'))} | {f2(p.get('destroy'))} "
            f"| {f2(p.get('qemu_exit'))} | {f2(p.get('sync'))} | {f2(s.get('restore_s'))} "
            f"| {f2(p.get('r_qemu_start'))} "
            f"| {f2(p.get('r_stream'))} | {f2(p.get('r_read'))} | {f2(p.get('r_after'))} |")
    return out


def stats_table(summ_g: dict[str, Any]) -> list[str]:
    out = ["| contender | op | engine wall s | input_wait s | producer_blocked s | output_wait s "
           "| worker_cpu s | chunks zstd/stored | direct | spliced |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for c in CONTENDERS:
        s = summ_g.get(c.key) or {}
        for which in ("save_stats", "restore_stats"):
            st = s.get(which)
            if not st:
                continue
            out.append(
                f"| {label(c.key)} | {which.split('_')[0]} | {f2(st.get('wall'))} | {f2(st.get('input_wait'))} "
                f"| {f2(st.get('producer_blocked'))} | {f2(st.get('output_wait'))} "
                f"| {f2(st.get('worker_cpu'))} | {f2(st.get('chunks_compressed'), '.0f')}/"
                f"{f2(st.get('chunks_stored'), '.0f')} | {st.get('direct')} | {st.get('spliced')} |")
    return out


def scaling_table(scal: dict[str, Any]) -> list[str]:
    out = ["| guest | RAM GiB | QEMU stream MB | producer limit s | fastsave default save s "
           "| fastsave engine peak RSS MiB | libvirt BYPASS_CACHE save s | libvirt iohelper peak RSS MiB "
           "| libvirt in-process VmHWM growth MiB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in scal["rows"]:
        out.append(
            f"| {r['guest']} | {r['mem_gib']:g} | {f2(r['stream_bytes'] / 1e6 if r['stream_bytes'] else None, '.0f')} "
            f"| {f2(r['producer_s'])} | {f2(r['fs_save_s'])} "
            f"| {f2(r['fs_rss_kib'] / 1024 if r['fs_rss_kib'] else None, '.1f')} | {f2(r['lv_save_s'])} "
            f"| {f2(r['lv_rss_kib'] / 1024 if r['lv_rss_kib'] else None, '.1f')} "
            f"| {f2(r['lv_inproc_kib'] / 1024 if r['lv_inproc_kib'] is not None else None, '.1f')} |")
    sl = scal["slopes"]
    out.append(f"| slope per GiB of RAM (mixed guests, least squares) | | | {f2(sl['producer_s'], '.3f')} s "
               f"| {f2(sl['fs_save_s'], '.3f')} s | {f2(sl['fs_rss_mib'], '.2f')} MiB "
               f"| {f2(sl['lv_save_s'], '.3f')} s | {f2(sl['lv_rss_mib'], '.2f')} MiB | |")
    return out


def channel_table(chan: dict[str, Any], gkey: str, ref: dict[str, Any]) -> list[str]:
    """fastsave's 1, 2, 4 channel rows of one guest: stream throughput in
    total and per channel, and each row against the targets' references."""
    rows = [r for r in chan["rows"] if r["guest"] == gkey]
    if not rows:
        return []
    out = ["| mode | channels | row | image streams | QEMU stream MB (per channel) | save s "
           "| save stream MB/s total / per channel (window) | x 1 ch | restore s "
           "| restore MB/s total / per channel (window) | x 1 ch | save / target ref "
           "| restore / target ref |",
           "|---|---:|---|---:|---|---:|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        per = r.get("channel_stream_bytes") or []
        per_txt = " + ".join(f"{b / 1e6:.0f}" for b in per) if len(per) > 1 else ""
        sref = ref.get("save_auto" if r["mode"] == "auto" else "save_zstd")
        out.append(
            f"| {r['mode']} | {r['channels']} | {label(r['key'])} "
            f"| {f2(r['image_streams'], '.0f')} "
            f"| {f2(r['stream_bytes'] / 1e6 if r['stream_bytes'] else None, '.0f')}"
            f"{f' ({per_txt})' if per_txt else ''} | {f2(r['save_s'])} "
            f"| {f2(r['save_mb_s'], '.0f')} / {f2(r['save_mb_s_per_channel'], '.0f')} "
            f"({r['save_window']}) | {f2(r['save_speedup'])} | {f2(r['restore_s'])} "
            f"| {f2(r['restore_mb_s'], '.0f')} / {f2(r['restore_mb_s_per_channel'], '.0f')} "
            f"({r['restore_window']}) | {f2(r['restore_speedup'])} "
            f"| {f2(ratio(r['save_s'], sref[1]) if sref else None, '.3f')}"
            f"{f' (<= {sref[2]:g})' if sref else ''} "
            f"| {f2(ratio(r['restore_s'], ref['restore'][1]) if ref.get('restore') else None, '.3f')}"
            f"{' (<= 0.7)' if ref.get('restore') else ''} |")
    return out


def projection_table(chan: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    proj = chan.get("projection") or []
    if not proj:
        return ["(no 1-channel row with a stream time: nothing to project from)"]
    disk = meta.get("disk") or {}
    out = [
        "**Projection, not a measurement.** From the target guest's 1-channel rows of this run: "
        "stream MB/s = the smallest of (channels = the count a save gets by default on that "
        "many cores, one per 4 cores from 8 up to 16 (`fastsave.channels.auto_count`), each as "
        "fast as the one channel measured here); "
        "(cores / CPU seconds per MB of stream, all processes on the machine, measured here); "
        "(this machine's disk, O_DIRECT "
        f"write {f2(disk.get('write_mb_s'), '.0f')} MB/s / read {f2(disk.get('read_mb_s'), '.0f')} "
        "MB/s, one sequential stream, times stream / image for what compression saves); "
        f"(memory: one thread's memcpy {f2(meta.get('mem_copy_mb_s'), '.0f')} MB/s x "
        f"min(cores, {MEM_THREADS_MAX}) / {COPIES_PER_BYTE} copies of each byte). It assumes QEMU's "
        "multifd threads and the engine scale until one of these runs out, a disk as fast as "
        "this one (a big host's array is usually faster: the disk term then grows with it), "
        "and no other load.", "",
        "| mode | op | cores | channels | per channel MB/s | bound: channels | CPU | disk | memory "
        "| projected MB/s | bound by | s per GiB of stream |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for p in proj:
        b = p["bounds"]
        out.append(
            f"| {p['mode']} | {p['op']} | {p['cores']} | {p['channels']} | {p['per_channel_mb_s']:.0f} "
            f"| {f2(b.get('channels'), '.0f')} | {f2(b.get('CPU'), '.0f')} | {f2(b.get('disk'), '.0f')} "
            f"| {f2(b.get('memory'), '.0f')} | {p['mb_s']:.0f} | {p['bound_by']} "
            f"| {p['s_per_gib_stream']:.2f} |")
    return out


def floors(data: dict[str, Any], summ: dict[str, Any]) -> list[str]:
    """What no contender can beat on this machine, from this run's own data."""
    s = summ.get(MAIN_GUEST, {})
    prod, base = s.get("limit-producer", {}), s.get(BASE, {})
    raw_mb = (s.get(RAW, {}).get("image_bytes") or 0) / 1e6
    disk = data["meta"].get("disk") or {}
    out = []
    if prod.get("save_s") and base.get("save_s"):
        ph = prod.get("phases", {})
        out.append(
            f"Floors on this machine ({data['guests'][MAIN_GUEST]['label']}): the producer limit "
            f"(pause, QEMU's one migration thread streaming into a pipe read to /dev/null, "
            f"stop) takes {prod['save_s']:.2f} s = {prod['save_s'] / base['save_s']:.2f}x "
            f"libvirt's BYPASS_CACHE save, of which {ph.get('destroy') or 0:.2f} s is "
            "libvirt stopping QEMU (it polls every 200 ms for the process to be gone): a save "
            "that goes through QEMU's migration stream cannot be faster than that. ")
    if disk and raw_mb:
        out[-1:] = [(out[-1] if out else "") +
                    f"The disk with O_DIRECT: write {disk['write_mb_s']:.0f} MB/s, read "
                    f"{disk['read_mb_s']:.0f} MB/s (one sequential stream, measured at the "
                    f"start of the run): writing the {raw_mb:.0f} MB raw stream takes "
                    f"{raw_mb / disk['write_mb_s']:.2f} s, reading it "
                    f"{raw_mb / disk['read_mb_s']:.2f} s."]
    return [line.rstrip() for line in out] + [""] if out else []


def _marks(data: dict[str, Any], summ: dict[str, Any]) -> dict[str, str]:
    """" [default: N ch]" for fastsave's default rows (N from the image when
    fastsave chooses per save)."""
    dch = default_channels(data)
    out = {}
    for key in (DEFAULT, ZSTD_DEFAULT):
        n = dch
        if n is None:
            seen = {streams_to_channels(sg[key].get("image_streams")) for sg in summ.values()
                    if key in sg} - {None}
            n = "/".join(str(x) for x in sorted(seen)) or "?"
            out[key] = f" [default: {n} ch, chosen per save]"
        else:
            out[key] = f" [default: {n} ch]"
    return out


def render(data: dict[str, Any], summ: dict[str, Any], scal: dict[str, Any],
           tg: list[dict[str, Any]], png_name: str,
           chan: dict[str, Any] | None = None) -> tuple[str, str]:
    m = data["meta"]
    g = data["guests"]
    MARKS.clear()
    MARKS.update(_marks(data, summ))
    head = [
        "# fastsave vs libvirt managed save" + (" (quick run: smoke only)" if m["quick"] else ""),
        "",
        f"{m['date']}, {m['cpus']} CPUs, {m['mem_gib']} GiB RAM, kernel {m['kernel']}, libvirt "
        f"{m.get('libvirt')} (embedded driver), QEMU {m.get('qemu')}, images on {m['fs']} "
        f"({m['work_dir']}); run took {m['duration_s'] / 60:.1f} min"
        + (f" (1-min load average {m['load_avg_start'][0]:.1f} at the start, "
           f"{m['load_avg_end'][0]:.1f} at the end)" if m.get("load_avg_end") else "")
        + (f", {m['os']}" if m.get("os") else "") + ". "
        "Regenerate: `.venv/bin/python -m benchmarks.scoreboard" + "".join(" " + a for a in m.get("args", [])) + "`.",
        "",
        "Each contender saves the running test guest (TCG, RAM partly filled with deterministic "
        "guest-like data: code, text, zeros, noise) and starts it again. The fill is loaded into "
        "RAM once, at the guest's first boot (QEMU `-device loader`), and that guest is saved with "
        "libvirt's plain save; every later start outside the timed steps restores that file with "
        "the XML without the loader, so the timed guests have no loader device and no start "
        "re-reads the fill (a real guest has no such device). Contenders alternate "
        "within every round. Times are medians (range in brackets when there are several rounds); "
        "save = the save call until it returns (the guest is paused, its QEMU gone) and its image "
        "is durable: fastsave syncs before it returns; after libvirt's calls an `fdatasync` of the "
        "image is timed too (\"call returned at\" is when libvirt's call itself returned; its "
        "`libvirt_iohelper` syncs the images it writes, so there the fdatasync finds nothing left; "
        "a sparse save is written by QEMU itself); restore = `dom.create()` (libvirt; "
        "`VIR_DOMAIN_START_BYPASS_CACHE` for the BYPASS_CACHE contender), "
        "`virConnectRestoreParams` (file, parallel.channels; with `VIR_DOMAIN_SAVE_BYPASS_CACHE` "
        "for the parallel BYPASS_CACHE contenders) or `fastsave.start(dom)` until it returns with "
        "the guest running. libvirt's parallel save exists only as a plain save to a file "
        "(`virDomainSaveParams` with image_format \"sparse\" and parallel.channels; libvirt "
        ">= 11.2; no managed form): its image size is what the sparse file occupies on disk. "
        "Contenders this libvirt does not offer are left out of the run (listed below). fastsave's default (no `direct` option) writes with O_DIRECT and reads "
        "through the page cache; `+direct` uses O_DIRECT both ways, `(buffered)` neither. After every restore the guest's boot id must be the one it had before the "
        "save (ok/attempts: a failed round is recorded, then tried once more; medians use the "
        "rounds that passed). Ratios are ratios of medians: times against libvirt BYPASS_CACHE, "
        "sizes against libvirt's raw image. Before each restore the image is synced and dropped "
        "from the page cache (`posix_fadvise(DONTNEED)`), as at a start after a host reboot; "
        "without it libvirt's buffered images would be read back from RAM. Machine CPU busy %: the share of all CPUs busy during the step, ours and "
        "anyone else's (a noise indicator on a shared machine). The gzip contender is not run "
        "on the 4 GiB guest (it alone would take ~5 minutes there).",
        "",
        "Peak RSS of the saving process: for fastsave the engine child (`python -m fastsave.worker`), "
        "for libvirt its helper children (`libvirt_iohelper`, which libvirt 9.0 uses for every save "
        "and which fdatasyncs the image, and the compressor for lzop/gzip): VmHWM sampled every "
        "20 ms from /proc. The embedded libvirt driver runs inside the benchmark's own process, so "
        "its in-process part is shown as that process's VmHWM growth during the save (peak reset "
        "before each save through /proc/self/clear_refs).",
        "",
        "QEMU reaping: libvirt stops a domain by signalling QEMU and polling until its pid is "
        "gone, so every stop waits until the QEMU zombie is reaped. On a host that is the "
        "init's job and takes no time; this machine's pid 1 reaped orphans only after "
        f"{m['init_reap_delay_s']:.2f} s (measured at the start of the run), which would add "
        "that much to every save of every contender. The agent processes that run the "
        "embedded driver therefore run under a small shim that is the subreaper of their "
        "QEMUs and reaps them at once, as an init does (`benchmarks/reaper.py`), for "
        "libvirt's contenders and fastsave's alike."
        if m.get("init_reap_delay_s") is not None else "",
        "",
        "Memory warm-up: this machine is itself a VM that hands freed memory back to its host "
        "(free page reporting), and touching memory that was handed back faults on the host "
        "side: 1.5 GiB took 1-3.5 s to touch after 3 s idle, 0.07 s right after a free. Every "
        "start writes a whole guest's RAM into a new QEMU, so which contender's restore paid "
        "that was a matter of timing (the same restore varied 0.6-2.8 s). Right before each "
        "timed start the agent touches and frees guest RAM + 512 MiB, as a host without such "
        "reporting always has it; the time it took is kept in the JSON (`warm_s`).",
        "",
        "Limits: the producer limit is QEMU migrating the paused guest into a 1 MiB pipe drained "
        "to /dev/null (splice), then the domain destroyed (pause, stream, stop: what any save "
        "must do); the consumer limit is a QEMU started paused with `-incoming defer` "
        "taking the captured stream from memory through a pipe, then resumed.",
        "",
    ]
    left = data.get("skipped") or {}
    if left:
        head += ["Not available on this stack: " + "; ".join(
            f"{BY_KEY[k].label} ({why})" for k, why in left.items()) + ".", ""]
    if m.get("only"):
        head += [f"Contenders chosen for this run (`--only`): {', '.join(m['only'])}.", ""]
    body: list[str] = []
    targets_block = ["```", *[ln for t in tg for ln in ([t["line"]] + (["    "
                                                                      + t["why"]] if t.get("why") else []))],
                     "```", "", *floors(data, summ)]
    main_tables: list[str] = []
    for gkey in data["guests"]:
        if gkey not in summ:
            continue
        title = f"## {g[gkey]['label']} (`{gkey}`), {g[gkey]['rounds']} round(s)"
        tbl = contender_table(summ[gkey])
        body += [title, "", *tbl, ""]
        if gkey == MAIN_GUEST:
            main_tables = [f"### {g[gkey]['label']}, {g[gkey]['rounds']} round(s)", "", *tbl, ""]
            body += [
                "### Where the time goes", "",
                "Medians in seconds. prepare: from the call to QEMU's `migrate` (pause, XML, engine "
                "start); QEMU stream: `migrate` until QEMU reports `completed`; data durable at: "
                "when the engine child / libvirt's helpers exited (image written and synced), "
                "counted from the call; after durable: the rest of the call (rename + directory "
                "fsync, stopping QEMU); destroy: the `virDomainDestroy` inside it (libvirt signals "
                "QEMU, then polls every 200 ms until the pid is gone); QEMU exit: QEMU's process "
                "from exiting (PF_EXITING) to gone (reaped). "
                "Restore: QEMU start = `createXML` of the paused `-incoming defer` domain; stream "
                "in: `migrate-incoming` until `completed`; helper done at: engine child / "
                "iohelper exit, from the call. libvirt's plain restore shows no helper: it hands "
                "QEMU the image file itself; its BYPASS_CACHE restore goes through "
                "`libvirt_iohelper` and a pipe, as fastsave's restore goes through its engine "
                "child and a pipe.", "",
                *phase_table(summ[gkey]), "",
                "fastsave engine Stats (medians):", "", *stats_table(summ[gkey]), "",
            ]
    if chan and chan.get("rows"):
        ref = _target_refs(tg)
        body += ["## Channels: fastsave's stream over 1, 2 and 4 channels", "",
                 "QEMU's multifd: N channels = QEMU's main stream plus N memory channels, an image "
                 "of N + 1 streams (1 channel = the single migration stream of before). Stream MB = "
                 "the QEMU stream the image holds (its streams' lengths in brackets); MB/s = that "
                 "over the stream's time: QEMU's `migrate` to `completed` (fastsave's trace hook) "
                 "or, where the hook reported nothing, from the call until the engine child was "
                 "done (\"to durable\", an upper bound on the stream's time, so a lower bound on "
                 "its rate); per channel = total / N. \"x 1 ch\" is the total against the same "
                 "mode's 1-channel row. The last two columns put each row against the targets' "
                 "references (libvirt's fastest save and restore; for zstd libvirt's zstd or "
                 f"fastest compressed save); the target counts for the default row. This machine: "
                 f"{m.get('cpus')} CPUs.", ""]
        for gkey in data["guests"]:
            tbl = channel_table(chan, gkey, ref)
            if tbl:
                body += [f"### {g[gkey]['label']} (`{gkey}`)", "", *tbl, ""]
        body += ["### Projection for 16 and 64 cores", "", *projection_table(chan, m), ""]
    scal_tbl = scaling_table(scal)
    body += ["## Scaling with guest size", "",
             "fastsave default (auto; O_DIRECT save, page-cache restore) and libvirt BYPASS_CACHE; the idle guest is "
             "shown but not part of the slope.", "", *scal_tbl, ""]
    fails = [r for r in data["rounds"] if not r.get("ok")]
    body += ["## Failures", ""]
    body += ([f"- {r['guest']} round {r['round']} attempt {r.get('attempt', 1)} "
              f"{BY_KEY[r['contender']].label}: {r.get('error')}"
              for r in fails] or ["none"])
    body += ["", f"Chart: `{png_name}`; every round's raw data: `{png_name[:-4]}.json`.", ""]
    md = "\n".join(head + ["## Targets", "", *targets_block, "", *body])
    if png_name[:-4] != "compare":  # one stack's run: its block in the README's section
        rounds = g.get(MAIN_GUEST, {}).get("rounds")
        readme = "\n".join([
            f"### {m.get('os', '?')}: libvirt {m.get('libvirt')}, QEMU {m.get('qemu')}",
            "",
            f"`python -m benchmarks.scoreboard{''.join(' ' + a for a in m.get('args', ['--quick'] if m['quick'] else []))}` "
            f"({m['date']}, {m['cpus']} CPUs, "
            f"images on {m['fs']}, {rounds} round(s) per contender, run took "
            f"{m['duration_s'] / 60:.1f} min"
            + (f"; 1-min load average {m['load_avg_start'][0]:.1f} at the start, "
               f"{m['load_avg_end'][0]:.1f} at the end" if m.get("load_avg_end") else "")
            + f"); details in "
            f"`benchmarks/results/{png_name[:-4]}.md`, chart `benchmarks/results/{png_name}`. "
            "Save = until the image is durable; ratios against libvirt BYPASS_CACHE (times) and "
            "libvirt's raw image (sizes).", "",
            *(main_tables[2:] if main_tables else ["(no data for the 1.5 GiB guest)", ""]),
            "Targets (per stack; under each MISS, where the time or the bytes go):", "",
            "```", *[ln for t in tg for ln in ([t["line"]] + (["    " + t["why"]]
                                                           if t.get("why") else []))], "```", "",
            *(["Channels (1.5 GiB guest; per-channel throughput and the 16/64-core projection "
               f"in `benchmarks/results/{png_name[:-4]}.md`):", "",
               *channel_table(chan, MAIN_GUEST, _target_refs(tg)), ""]
              if chan and channel_table(chan, MAIN_GUEST, _target_refs(tg)) else []),
            *([("Not available on this stack: " + "; ".join(f"{BY_KEY[k].label} ({why})"
                                                         for k, why in left.items()) + "."), ""]
              if left else []),
            *(["Failed rounds: " + "; ".join(f"{BY_KEY[r['contender']].label}: {r.get('error')}"
                                             for r in fails if r["guest"] == MAIN_GUEST), ""]
              if any(r["guest"] == MAIN_GUEST for r in fails) else []),
        ])
        return md, readme
    readme = "\n".join([
        f"Latest full run of `python -m benchmarks.scoreboard` ({m['date']}, {m['cpus']} CPUs, libvirt "
        f"{m.get('libvirt')}, QEMU {m.get('qemu')}, images on {m['fs']}); details, the time "
        "breakdown and the other guests in `benchmarks/results/compare.md`. Save and restore "
        "times are medians, ratios against libvirt BYPASS_CACHE (times) and libvirt's raw image "
        "(sizes).", "",
        *main_tables, "### Scaling", "", *scal_tbl, "", "### Targets", "", *targets_block, "",
        "![save, restore, size, RSS](benchmarks/results/compare.png)", ""])
    return md, readme


def _target_refs(tg: list[dict[str, Any]]) -> dict[str, tuple[str, float, float]]:
    """The references of the time targets, from their checks: {"save_auto",
    "save_zstd", "restore": (label, reference seconds, limit)}."""
    out: dict[str, tuple[str, float, float]] = {}
    for t in tg:
        if t.get("role") and t.get("ref_s"):
            out[t["role"]] = (t["label"], t["ref_s"], t["limit"])
    return out
