"""lab's own commands in the command palette (ctrl+p), as Posting offers its own.

Each entry is (title, help, action): the action runs on the main screen, as its key binding would
("app." actions on the app). More commands are added by appending to COMMANDS.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

from textual.command import DiscoveryHit, Hit, Hits, Provider


class Command(NamedTuple):
    title: str
    help: str
    action: str


COMMANDS: list[Command] = [
    Command("Run needle", "Run the needle probe under the plan (n)", "run_probe('needle')"),
    Command("Run MMLU", "Run the MMLU probe under the plan (u)", "run_probe('mmlu')"),
    Command("Score heads", "Score attention heads on needle prompts (r)", "score_heads"),
    Command("Cancel job", "Stop the running job; finished trials are kept (x)", "cancel_probe"),
    Command("Open preset", "Open a preset file (ctrl+o)", "open_preset"),
    Command("Save preset", "Save model, plan and probe settings (ctrl+s)", "save_preset"),
    Command("Pick model", "Load another model: a builtin toy, random:<type> or a hub id", "pick_model"),
    Command("Clear plan", "Back to the base model: nothing off, phase both (c)", "clear"),
    Command("Toggle all attention", "Every attention block off, or all on again (a)", "toggle_kind('attention')"),
    Command("Toggle all SSM", "Every SSM/recurrent block off, or all on again (s)", "toggle_kind('ssm')"),
    Command("Toggle all MLP", "Every MLP block off, or all on again (m)", "toggle_kind('mlp')"),
    Command("Cycle phase", "Plan acts in both phases, prefill only or generation only (p)", "phase"),
    Command("Switch overlay", "Colour heads by a score or the last needle run's effect (o)", "overlay"),
    Command("Heatmap absolute / delta", "Heatmap cells as scores or as the difference to the base run (d)",
            "heatmap_delta"),
    Command("Needle attention in generation", "Cycle keep, omit, only, balanced, null (g)",
            "needle_mode('generation')"),
    Command("Needle attention in prefill", "Cycle keep, omit, only, balanced, null, follow (G)",
            "needle_mode('prefill')"),
    Command("Sweep the heads of this layer", "Each head of the cursor's attention layer off alone (w)",
            "sweep('heads')"),
    Command("Sweep this kind of block", "Each block of the cursor's kind off alone (b)", "sweep('blocks')"),
    Command("Sweep k", "The paper's sparsification, k = 0..heads, with random controls (K)", "sweep('k')"),
    *(Command(f"Sweep over {axis}", f"lab sweep --over {axis}, detached; the Sweep tab follows it", f"sweep('{axis}')")
      for axis in ("attention-layers", "ssm-layers", "mlp-layers", "kv-heads", "experts", "keep-top")),
    Command("Show a stored sweep", "A finished sweep's effect map and chart, by its id (S)", "show_sweep"),
    Command("Runs of every model", "Runs tab: every model's runs or this model's (v)", "all_runs"),
    Command("Help", "Every key, its binding id and what it does (F1)", "app.help"),
    Command("Quit", "Quit lab; asks first while a job runs or the plan is unsaved (q)", "app.quit"),
]


class LabCommands(Provider):
    """Offers COMMANDS; a chosen one runs as an action of the screen the palette was opened on."""

    async def _run(self, action: str) -> None:
        await self.app.run_action(action, self.screen)

    async def discover(self) -> Hits:
        for command in COMMANDS:
            yield DiscoveryHit(command.title, partial(self._run, command.action), help=command.help)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for command in COMMANDS:
            score = matcher.match(command.title)
            if score > 0:
                yield Hit(score, matcher.highlight(command.title), partial(self._run, command.action),
                          help=command.help)
