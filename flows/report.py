"""What a flow run shows in Prefect: a markdown report, a link to the HTML report, the rejected files, the
confusion matrix, the metrics."""

from __future__ import annotations

import base64
from pathlib import Path

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from tasks.files import read_json
from tasks.layout import Layout
from tasks.report import REPORT_HTML, gate_markdown, published_report, read_rows, report_markdown, this_models_publish


def publish_artifacts(layout: Layout, outcome: dict[str, str]) -> None:
    """Creates the run's artifacts: report, a link to the HTML report, the gate's decision, rejected files, confusion
    matrix image, metrics table."""
    # A run of some stages only (`imgclf run evaluate`) leaves an earlier model's gate and page behind.
    published = this_models_publish(layout)
    gate = published.get("gate")
    create_markdown_artifact(key="imgclf-report", markdown=report_markdown(layout, outcome, gate), description="imgclf run report")
    page = layout.root / REPORT_HTML
    if page.exists() and "report" in outcome:
        where = published_report(published) or str(page)  # the published copy outlives this machine's
        create_link_artifact(key="imgclf-html-report", link=where if "://" in where else Path(where).resolve().as_uri(),
                             link_text="Run report (HTML)", description="The run report to open in a browser")  # fmt: skip
    if gate:
        create_markdown_artifact(key="imgclf-gate", markdown=gate_markdown(gate),
                                 description="Champion/challenger gate: whether latest.json moved to this run, and why")  # fmt: skip
    rejected = [{key: row[key] for key in ("path", "label", "status", "reason", "detail")}
                for row in read_rows(layout.manifest_csv) if row["status"] != "valid"]  # fmt: skip
    create_table_artifact(key="imgclf-rejected", table=rejected or [{"path": "", "reason": "none rejected"}],
                          description="Files validate did not accept, with the reason")  # fmt: skip
    confusion = layout.plots_dir / "confusion_matrix.png"
    if confusion.exists():
        encoded = base64.b64encode(confusion.read_bytes()).decode()
        create_markdown_artifact(key="imgclf-confusion", markdown=f"![confusion matrix](data:image/png;base64,{encoded})",
                                 description="Confusion matrix on the test split")  # fmt: skip
    evaluation = read_json(layout.metrics_dir / "eval.json")
    if evaluation:
        table = [{"class": name, **scores} for name, scores in evaluation["per_class"].items()]
        table.append({"class": "(all)", "accuracy": evaluation["accuracy"], "macro_f1": evaluation["macro_f1"],
                      "roc_auc": evaluation.get("roc_auc", ""), "support": evaluation["n_test"]})  # fmt: skip
        create_table_artifact(key="imgclf-metrics", table=table, description="Test-split metrics")
