"""Demo scaffolding: a synthetic moderation task that runs the whole system on any CPU.

* :mod:`icm.demo.synth`: drawn figures whose attribute values are visible, and the
  train / held-out data sets of ``icm data synth``;
* :mod:`icm.demo.teacher`: the scripted teacher (an MLLM/LLM stand-in that reads the
  figures) and its OpenAI-compatible server on loopback;
* :mod:`icm.demo.e2e`: ``icm demo e2e``, the loop from data generation through tuning,
  moderation and evaluation to a rule-set switch without retraining.

Nothing outside the demo, the CLI's ``icm data synth`` / ``icm demo`` and the tests
imports this package.
"""
