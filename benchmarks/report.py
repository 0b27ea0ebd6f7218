"""Turn a ``pytest benchmarks/ --benchmark-json=FILE`` result into Markdown.

    python benchmarks/report.py results.json > benchmarks/README.md
"""

from __future__ import annotations

import json
import sys

HEADER = """# Benchmarks

Produced by `pytest benchmarks/ --benchmark-only --benchmark-json=results.json`
and `python benchmarks/report.py results.json > benchmarks/README.md`.
Times are medians of calls timed in alternation within one run: on CUDA
device time from CUDA events (no L2 flush between calls; inputs rotate
through sets larger than the L2), plus CUDA-graph replays and host time for
small tensors; on CPU wall time.
"""


def main(path: str) -> str:
    report = json.load(open(path))
    machine, commit = report["machine_info"], report.get("commit_info", {})
    benches = report["benchmarks"]
    info = [b["extra_info"] for b in benches]
    device = next((i["device"] for i in info if "device" in i), "?")
    lines = [HEADER,
             f"- device: **{device}** ({machine.get('cpu', {}).get('brand_raw', '?')})",
             f"- date: {report['datetime'][:10]}, commit {commit.get('id', '?')[:10]}",
             f"- python {machine.get('python_version')}, torch {versions(report, 'torch')}, "
             f"triton {versions(report, 'triton')}", ""]
    copy = next((i["copy_gbps"] for i in info if "copy_gbps" in i), None)
    if copy:
        lines += [f"Measured copy bandwidth (read + write): **{copy:.1f} GB/s**.", ""]
    lines += op_table([b for b in benches if b["name"].startswith("test_scale_channels")])
    lines += overhead_tables(info)
    return "\n".join(lines) + "\n"


def versions(report, name):
    return report.get("frem_versions", {}).get(name, "?")


def op_table(benches) -> list[str]:
    rows = [b["extra_info"] for b in benches if isinstance(b["extra_info"].get("ms"), dict)
            and not b["extra_info"].get("huge")]
    huge = [b["extra_info"] for b in benches if b["extra_info"].get("huge")]
    if not rows and not huge:
        return []
    lines = ["## `frem.scale_channels` vs the kernel alone, eager, compiled and a copy", "",
             "All five timed in alternation within each row. `frem` is what FREM calls (it picks "
             "the path: plain torch ops below the size threshold, on CPU and under torch.compile); "
             "`kernel` is the registered op itself (Triton on CUDA). '% of copy' = the time of "
             "`copy_` over the same bytes, measured in the same row, divided by the time. "
             "'compiled' says how many graphs Dynamo built for the row (0 would mean it ran eager).", "",
             "| shape | dtype | layout | pass | frem ms | kernel ms | eager ms | compiled ms | copy ms | "
             "frem % of copy | kernel % of copy | eager / frem | compiled / frem | compiled |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i in rows:
        ms, cf = i["ms"], i["copy_fraction"]
        lines.append(f"| {i['shape']} | {i['dtype']} | {i['layout']} | {i['direction']} | {ms['frem']:.3f} | "
                     f"{ms['kernel']:.3f} | {ms['eager']:.3f} | {ms['compiled']:.3f} | {ms['copy']:.3f} | "
                     f"{100 * cf['frem']:.0f}% | {100 * cf['kernel']:.0f}% | {ms['eager'] / ms['frem']:.2f} | "
                     f"{ms['compiled'] / ms['frem']:.2f} | {i.get('compiled_graphs', '?')} graph(s) |")
    for i in huge:
        ms, cf = i["ms"], i["copy_fraction"]
        lines.append(f"| {i['shape']} (> 2^31) | bf16 | nchw | forward+backward | {ms['frem']:.3f} | | "
                     f"{ms['eager']:.3f} | | {ms['copy']:.3f} | {100 * cf['frem']:.0f}% | | "
                     f"{ms['eager'] / ms['frem']:.2f} | | |")
    small = [i for i in rows if "host_us" in i]
    if small:
        names = ("frem", "kernel", "eager", "compiled", "copy")
        lines += ["", "### Small tensors: device time (CUDA-graph replay) and host time a call, µs", "",
                  "| shape | dtype | layout | pass | " + " | ".join(f"{n} device / host" for n in names) + " |",
                  "|---|---|---|---|" + "---|" * len(names)]
        for i in small:
            cells = []
            for n in names:
                device = i["graph_us"].get(n)
                device = f"{device:.1f}" if isinstance(device, float) else "n/a"
                cells.append(f"{device} / {i['host_us'][n]:.1f}")
            lines.append(f"| {i['shape']} | {i['dtype']} | {i['layout']} | {i['direction']} | "
                         + " | ".join(cells) + " |")
    return lines + [""]


def overhead_tables(info) -> list[str]:
    lines = []
    for i in info:
        if "ratio" in i and "export_nodes" in i:
            lines += ["## Inference overhead (eval mode, FREM attached vs bare, interleaved)", "",
                      f"smp.Unet tu-seresnet34, batch {i['batch']}, {i['size']}x{i['size']}, B=162, X=632.", "",
                      "| bare ms | attached ms | attached / bare | bare / bare (noise) | export ops bare = attached |",
                      "|---|---|---|---|---|",
                      f"| {i['ms']['bare']:.2f} | {i['ms']['attached']:.2f} | {i['ratio']:.3f} | "
                      f"{i['noise_ratio']:.3f} | {i['export_nodes']['bare']} = {i['export_nodes']['attached']} |", ""]
        elif "ratio" in i and "counted" in i["ms"]:
            lines += ["## frem.status's call counter in a training step", "",
                      f"smp.Unet tu-seresnet34, batch {i['batch']}, {i['size']}x{i['size']}, B=162, X=632; the same "
                      "attached model with FREM's call counter on and off, interleaved.", "",
                      "| off ms | on ms | on / off | off / off (noise) |", "|---|---|---|---|",
                      f"| {i['ms']['uncounted']:.1f} | {i['ms']['counted']:.1f} | {i['ratio']:.3f} | "
                      f"{i['noise_ratio']:.3f} |", ""]
        elif "ratio" in i:
            peak = i.get("peak_bytes") or {}
            memory = (f"{peak['bare'] / 2**20:.1f} / {peak['attached'] / 2**20:.1f} MiB "
                      f"(+{(peak['attached'] - peak['bare']) / 2**20:.2f}; one activation "
                      f"{peak['one_activation'] / 2**20:.2f})" if peak else "not measured on CPU")
            lines += ["## Training overhead (one step: forward, loss, backward, Adam)", "",
                      f"smp.Unet tu-seresnet34, batch {i['batch']}, {i['size']}x{i['size']}, B=162, X=632.", "",
                      "| bare ms | attached ms | attached / bare | bare / bare (noise) | peak memory bare / attached |",
                      "|---|---|---|---|---|",
                      f"| {i['ms']['bare']:.1f} | {i['ms']['attached']:.1f} | {i['ratio']:.3f} | "
                      f"{i['noise_ratio']:.3f} | {memory} |", ""]
        elif "bytes_per_pixel" in i:
            sizes = sorted(i["predict_peak_bytes"], key=int)
            lines += ["## Memory: `frem predict` on one large image", "",
                      f"{i['model']}, {i['image']}, on the CPU; the peak resident set above what the process "
                      "held before the call (a fresh process per size). The slope is what each further pixel costs.", "",
                      "| " + " | ".join(f"{s}x{s} peak" for s in sizes) + " | bytes per pixel (slope) |",
                      "|" + "---|" * (len(sizes) + 1),
                      "| " + " | ".join(f"{i['predict_peak_bytes'][s] / 2**20:.0f} MiB" for s in sizes)
                      + f" | {i['bytes_per_pixel']:.1f} |", ""]
        elif "trainer_images_per_s" in i:
            lines += ["## End to end: `frem train` vs the model's own step", "",
                      f"{i['protocol']}.", "",
                      "| trainer images/s | model step images/s | trainer / model | epoch s (with validation) |",
                      "|---|---|---|---|",
                      f"| {i['trainer_images_per_s']:.1f} | {i['model_images_per_s']:.1f} | "
                      f"{i['trainer_images_per_s'] / i['model_images_per_s']:.2f} | {i['epoch_s']:.2f} |", ""]
    return lines


if __name__ == "__main__":
    sys.stdout.write(main(sys.argv[1]))
