"""Addition problems as GSM8K-style JSONL rows (question, answer, worked solution), for the
end-to-end tests' small data sets."""
import json
from pathlib import Path

from rl.tasks.arith import column_steps


def write_rows(path: Path, rows) -> str:
    with open(path, "w") as f:
        for a, b in rows:
            steps, total = column_steps([a, b])
            f.write(json.dumps({"question": f"{a}+{b}", "answer": str(total),
                                "solution": "\n".join(steps + [f"#### {total}"])}) + "\n")
    return str(path)
