"""Sum py-spy's collapsed stacks (`--format raw`) by function: where a profiled run spent its
samples, per thread, by self time and by total time.

    .venv/bin/python bench/stacks.py FILE [--top 25] [--thread NAME]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.+?) \((?P<where>[^()]*)\)$")


def _name(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    where = match.group("where").rsplit("/", 1)[-1]
    return f"{match.group('function')} ({re.sub(r':[0-9]+$', '', where)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--thread", help="only stacks whose thread name contains this")
    args = parser.parse_args()
    self_time: Counter[str] = Counter()
    total_time: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    for line in args.file.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread = frames[0]
        if args.thread and args.thread not in thread:
            continue
        count = int(count_text)
        samples += count
        threads[thread] += count
        names = [_name(frame) for frame in frames[1:]]
        if names:
            self_time[names[-1]] += count
        for name in set(names):
            total_time[name] += count
    print(f"{samples} samples")
    for thread, count in threads.most_common():
        print(f"  {count:7d} {100 * count / samples:5.1f}%  {thread}")
    for title, counter in (("self", self_time), ("total", total_time)):
        print(f"\nby {title} time")
        for name, count in counter.most_common(args.top):
            print(f"  {count:7d} {100 * count / samples:5.1f}%  {name}")


if __name__ == "__main__":
    main()
