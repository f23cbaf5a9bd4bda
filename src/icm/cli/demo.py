"""`icm demo ...`: runnable demonstrations of the whole system; thin over icm.demo.e2e."""

from __future__ import annotations

from pathlib import Path

import typer

from icm.cli.common import console, err_console, print_json

app = typer.Typer(help="Demonstrations that run anywhere (CPU, no model hub).", no_args_is_help=True)


@app.command("e2e")
def e2e(
    workdir: Path = typer.Option(Path("icm-e2e"), "--workdir", "-w", help="Where every artefact of the run goes."),
    train_images: int = typer.Option(1080, help="Synthetic training images."),
    test_images: int = typer.Option(270, help="Held-out test images."),
    general_examples: int = typer.Option(1000, help="Text-only general instructions mixed in (MSFT)."),
    max_steps: int = typer.Option(1500, help="Training steps (the cap, with --target-loss)."),
    target_loss: float | None = typer.Option(
        None, help="Train until the logged training loss is below this, at most --max-steps steps (fails if the cap comes first)."),
    learning_rate: float = typer.Option(1e-3, help="Peak learning rate."),
    threads: int = typer.Option(2, help="torch CPU threads."),
    rules: str = typer.Option("general", help="Rule set A of synth-shapes."),
    relabel_to: str = typer.Option("teen", help="Rule set B: moderate again under it, without retraining."),
    min_accuracy: float | None = typer.Option(0.95, help="Exit 1 below this ICM accuracy (use a negative value to only report)."),
    seed: int = typer.Option(0, help="Seed of the data and the training."),
    json_: bool = typer.Option(False, "--json", help="Print the result as JSON at the end."),
) -> None:
    """The whole loop on this machine: synth data, generate, train a tiny VLM (LoRA), moderate, evaluate, relabel.

    Prints each stage's time and ends with a line `ICM accuracy: 0.xxxx`.
    """
    from icm.demo.e2e import E2EConfig, report_lines, run_e2e

    cfg = E2EConfig(workdir=str(workdir), train_images=train_images, test_images=test_images,
                    general_examples=general_examples, max_steps=max_steps, target_loss=target_loss, learning_rate=learning_rate,
                    threads=threads, rules=rules, relabel_to=relabel_to, seed=seed,
                    min_accuracy=min_accuracy if min_accuracy is not None and min_accuracy >= 0 else None)

    def say(line: str) -> None:
        err_console.print(line, highlight=False, soft_wrap=True, markup=False)

    try:
        res = run_e2e(cfg, say=say)
    except RuntimeError as exc:
        err_console.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(1) from None
    if json_:
        print_json(res.as_dict())
    for line in report_lines(cfg, res):
        console.print(line, highlight=False, soft_wrap=True, markup=False)
    low = cfg.min_accuracy is not None and (res.icm_accuracy or 0.0) < cfg.min_accuracy
    raise typer.Exit(0 if res.ok and not low else 1)
