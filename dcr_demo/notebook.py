"""The sample notebook each demo researcher finds in their home: a summary table and a plot.

It reads its data at ``/data/<provider>/<dataset>/<file>``, the path that shows the synthetic file in the
researcher's sandbox and the real one in the enclave, so the same notebook runs unchanged in both stages.
"""

from __future__ import annotations

import nbformat

NOTEBOOK_NAME = "analysis.ipynb"

_INTRO = """\
# Charges by smoking status

This notebook reads `{path}`. In your JupyterLab that file is the **synthetic** version of the data set
(made with differential privacy from the real rows); run it here to check it works.

Then click **Submit to enclave** in the notebook toolbar: the same notebook, unchanged, runs on the **real**
data in the (locally simulated) enclave. Follow it in the *DCR jobs* panel, open the executed notebook when
it has finished, and look at the receipt that says which code ran on which data. The first code cell prints
the sha256 of the file it read: it differs between the two runs, because the file does."""

# The file's digest tells the two stages apart (the synthetic table has as many rows as the real one) and
# says nothing about the rows; 12 hex digits are plenty to compare by eye.
_LOAD = """\
import hashlib

import pandas as pd

path = "{path}"
df = pd.read_csv(path)
with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()[:12]
print(f"{{len(df)}} rows, columns: {{', '.join(df.columns)}}")
print(f"sha256 of the file: {{digest}}")"""

_SUMMARY = """\
summary = df.groupby("smoker")["charges"].agg(["count", "mean", "median"]).round(2)
summary.to_csv("summary.csv")
summary"""

_PLOT = """\
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 4))
for label, part in df.groupby("smoker"):
    ax.scatter(part["age"], part["charges"], s=6, alpha=0.6, label=f"smoker: {label}")
ax.set_xlabel("age")
ax.set_ylabel("yearly charges")
ax.set_title("Charges by age and smoking status")
ax.legend()
fig.savefig("charges.png", dpi=100)
plt.show()"""


def sample_notebook(data_path: str) -> nbformat.NotebookNode:
    """The sample notebook, reading the CSV at ``data_path`` (``/data/<provider>/<dataset>/<file>``)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell(_INTRO.format(path=data_path)),
        nbformat.v4.new_code_cell(_LOAD.format(path=data_path)),
        nbformat.v4.new_code_cell(_SUMMARY),
        nbformat.v4.new_code_cell(_PLOT),
    ]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def sample_notebook_bytes(data_path: str) -> bytes:
    return nbformat.writes(sample_notebook(data_path)).encode()
