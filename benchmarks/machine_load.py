"""The machine's load, printed by every benchmark at its start and end.

Ratios are measured side by side in one process, so they tolerate other jobs better than
absolute times do; a load average above the core count means the absolute figures are inflated.
"""

import os


def describe() -> str:
    one, five, fifteen = os.getloadavg()
    return (
        f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) on "
        f"{os.cpu_count()} cores"
    )
