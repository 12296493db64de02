"""dyn as a library: embed the GSM8K training questions and keep the 200 most spread-out ones.

    python examples/select_diverse.py [OUTPUT.jsonl]

Same recipe as `dyn select --method hmin`, called from Python; prints the run's figures.
"""

import json
import sys
from pathlib import Path

from dyn.selection.run import SelectRequest, run_hmin_selection

data = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k-train.jsonl"
output = sys.argv[1] if len(sys.argv) > 1 else "gsm8k-diverse-200.jsonl"

summary = run_hmin_selection(SelectRequest(data=str(data), output=output, k=200, text_field="question"))
print(json.dumps(summary["figures"], indent=2))
print(f"wrote {summary['output']} (run record: {summary['run_record']})")
