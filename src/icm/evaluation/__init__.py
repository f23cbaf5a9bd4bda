"""Evaluation of moderation: ICM accuracy, moderation Q-A, explanation quality, reports.

One concept per module:

* :mod:`~icm.evaluation.results` reads moderation results (our JSONL, the paper's JSON);
* :mod:`~icm.evaluation.labels` gives their truth through a policy and a rule set;
* :mod:`~icm.evaluation.icm_metrics` scores them (per image, or the published scripts' way,
  :mod:`~icm.evaluation.icm_paper`), with every confusion figure from :mod:`~icm.evaluation.confusion`
  and every interval from :mod:`~icm.evaluation.stats`;
* :mod:`~icm.evaluation.mqa` scores moderation Q-A answers;
* :mod:`~icm.evaluation.meq`, :mod:`~icm.evaluation.meq_judge`, :mod:`~icm.evaluation.meq_offline`
  score explanations (existing judgements, an LLM judge, or offline);
* :mod:`~icm.evaluation.registry` lists every metric as data, its paths checked when registered;
* :mod:`~icm.evaluation.summary`, :mod:`~icm.evaluation.report`, :mod:`~icm.evaluation.compare`,
  :mod:`~icm.evaluation.tables` save, render and compare runs;
* :mod:`~icm.evaluation.run` does it all over an evaluation set (``icm eval run``).

Heavy dependencies (scikit-learn, matplotlib, sentence-transformers) are imported only
when a figure needs them.
"""

from icm.evaluation.compare import CompareReport, compare, compare_files
from icm.evaluation.confusion import Confusion
from icm.evaluation.icm_metrics import ICMReport, evaluate_icm
from icm.evaluation.labels import LabelResolver, Truth, read_labels_file
from icm.evaluation.meq import MEQReport, read_explanations, read_judgements_dir
from icm.evaluation.meq_judge import Judge, JudgeConfig, parse_judgement
from icm.evaluation.mqa import MQAReport, QARecord, evaluate_paper_folder, evaluate_records_file, evaluate_two_line
from icm.evaluation.registry import METRICS, MetricSpec
from icm.evaluation.results import ResultItem, ResultSet, read_results
from icm.evaluation.summary import EvalSummary, load_summary

__all__ = [
    "METRICS", "CompareReport", "Confusion", "EvalSummary", "ICMReport", "Judge", "JudgeConfig", "LabelResolver", "MEQReport",
    "MQAReport", "MetricSpec", "QARecord", "ResultItem", "ResultSet", "Truth", "compare", "compare_files", "evaluate_icm",
    "evaluate_paper_folder", "evaluate_records_file", "evaluate_two_line", "load_summary", "parse_judgement",
    "read_explanations", "read_judgements_dir", "read_labels_file", "read_results",
]
