"""Figures, targets and the one table they are printed in."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field


@dataclass
class Figure:
    """One measured figure: its samples, and the reference its median is compared with."""

    section: str
    label: str
    unit: str
    samples: list[float]
    latency: bool = False  # a latency also gets its p99
    reference: Figure | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p99(self) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]

    @property
    def ratio(self) -> float | None:
        if self.reference is None or self.reference is self or not self.reference.median:
            return None
        return self.median / self.reference.median

    def as_dict(self) -> dict:
        return {
            "section": self.section,
            "figure": self.label,
            "unit": self.unit,
            "median": self.median,
            "p99": self.p99 if self.latency else None,
            "reference": self.reference.label if self.reference else None,
            "ratio": self.ratio,
            "samples": self.samples,
        }


@dataclass
class Target:
    section: str
    text: str
    met: bool
    measured: str


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    machine: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # each section's duration

    def add(self, section: str, label: str, unit: str, samples: list[float], **kw) -> Figure:
        figure = Figure(section, label, unit, [float(s) for s in samples], **kw)
        self.figures.append(figure)
        return figure

    def target(self, section: str, text: str, met: bool, measured: str) -> None:
        self.targets.append(Target(section, text, met, measured))

    def table(self, titles: dict[str, str]) -> str:
        """Every figure under its section's title: median, p99 for latencies, ratio to its reference."""
        rows = [("figure", "unit", "median", "p99", "ratio")]
        lines: list[tuple[str, ...] | str] = []
        for section, title in titles.items():
            if section in self.skipped:
                lines.append(f"{title}: skipped, {self.skipped[section]}")
                continue
            mine = [f for f in self.figures if f.section == section]
            if not mine:
                continue
            lines.append(title)
            for f in mine:
                ratio = "ref" if f.reference is f else (f"{f.ratio:.2f}x" if f.ratio is not None else "-")
                lines.append(("  " + f.label, f.unit, _num(f.median), _num(f.p99) if f.latency else "", ratio))
        width = [max(len(r[i]) for r in rows + [x for x in lines if isinstance(x, tuple)]) for i in range(5)]

        def fmt(r: tuple[str, ...]) -> str:
            return f"{r[0]:<{width[0]}}  {r[1]:<{width[1]}}  " + "  ".join(
                f"{c:>{w}}" for c, w in zip(r[2:], width[2:], strict=True)
            )

        out = [fmt(rows[0])]
        out += [fmt(x) if isinstance(x, tuple) else x for x in lines]
        if self.targets:
            out.append("targets")
            out += [f"  {'met   ' if t.met else 'MISSED'} {t.text}: {t.measured}" for t in self.targets]
        return "\n".join(out)

    def write_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(
                {
                    "machine": self.machine,
                    "figures": [fig.as_dict() for fig in self.figures],
                    "targets": [t.__dict__ for t in self.targets],
                    "skipped": self.skipped,
                    "seconds": self.seconds,
                },
                f,
                indent=1,
            )


def _num(x: float) -> str:
    if x == int(x) or abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"
