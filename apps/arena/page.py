"""What the arena page says and how it behaves in the browser: options, reveal captions, keys, layout CSS.

Why separate from :mod:`.app`: the wording and the browser-side script are read and changed for
reasons of their own (what a voter sees), apart from the server's logic (who may vote, what is stored).

Reveal: after a vote each image gets a caption naming its model, the chosen side marked; the
captions stay until the next pair is shown, either when the voter asks (``next``: a Next button,
also Space or N) or after ``reveal_seconds`` (``pause``). Before a vote the captions are empty:
model names are never in the page before its vote.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffalign.apps.arena.display import DEFAULT_DISPLAY_SIZE, UPSCALE_FILTERS

__all__ = ["CAPTION_CLASS", "CHOICE_LABELS", "PICKED_CLASS", "caption_classes", "progress_line", "PageOptions", "REVEAL_MODES", "SHORTCUTS", "page_css", "reveal_captions", "reveal_summary"]

REVEAL_MODES = ("next", "pause")
MAX_REVEAL_SECONDS = 60.0
CHOICE_LABELS = {"left": "Left is better", "right": "Right is better", "tie": "Tie", "both_bad": "Both bad"}


@dataclass(frozen=True)
class PageOptions:
    """How pairs are shown: display size and upscale filter (:mod:`.display`), and how a vote is revealed."""

    display_size: int = DEFAULT_DISPLAY_SIZE  # CSS px of each image box, and the size small images are scaled to
    upscale: str = "nearest"  # nearest | bicubic | none
    reveal: str = "next"  # next: a Next button (Space / N); pause: the next pair after reveal_seconds
    reveal_seconds: float = 2.0

    def __post_init__(self) -> None:
        if self.upscale not in UPSCALE_FILTERS:
            raise ValueError(f"--upscale {self.upscale!r}: expected one of {', '.join(UPSCALE_FILTERS)}")
        if not 64 <= self.display_size <= 4096:
            raise ValueError(f"--display-size {self.display_size}: expected 64 to 4096 pixels")
        if self.reveal not in REVEAL_MODES:
            raise ValueError(f"--reveal {self.reveal!r}: expected one of {', '.join(REVEAL_MODES)}")
        if not 0.0 < self.reveal_seconds <= MAX_REVEAL_SECONDS:
            raise ValueError(f"--reveal-seconds {self.reveal_seconds:g}: expected more than 0 and at most "
                             f"{MAX_REVEAL_SECONDS:g}")


CAPTION_CLASS = "arena-caption"
PICKED_CLASS = "arena-picked"  # the caption of the side the voter chose: highlighted (see page_css)


def reveal_captions(choice: str, left_model: str, right_model: str) -> tuple[str, str]:
    """The Markdown under the left and the right image once the vote on them is counted.

    Marks are plain Unicode (✓, =, ✗) that every system font has; emoji render as boxes without an emoji font.
    """
    marks = {"left": ("✓ your pick", ""), "right": ("", "✓ your pick"), "tie": ("= tie", "= tie"),
             "both_bad": ("✗ both bad", "✗ both bad")}[choice]
    return tuple(f"### {side}: `{model}` {mark}".rstrip()
                 for side, model, mark in (("Left", left_model, marks[0]), ("Right", right_model, marks[1])))


def caption_classes(choice: str | None, side: str) -> list[str]:
    """CSS classes of a side's caption: highlighted when the voter picked that side."""
    return [CAPTION_CLASS, PICKED_CLASS] if choice == side else [CAPTION_CLASS]


def reveal_summary(result: dict, choice: str, options: PageOptions) -> str:
    """The line under the buttons after a vote: what was chosen and counted, and how to go on."""
    if options.reveal == "pause":
        then = f"The next pair comes in {options.reveal_seconds:g} s."
    else:
        then = "Press **Next** (Space / N) for the next pair."
    if not result["accepted"]:
        return f"**Vote not counted:** {result['reason']}. {then}"
    return (f"You chose **{CHOICE_LABELS[choice]}**. Left was **{result['left_model']}**, right was "
            f"**{result['right_model']}**. {then}")


def progress_line(votes: int, pairs_left: int) -> str:
    """The session's standing, under the buttons."""
    return f"Votes this session: **{votes}** · pairs left for you: {pairs_left}"


# Keyboard: 1 / ArrowLeft, 2 / ArrowRight, 3 / t (tie), 4 / b (both bad); Space / n for Next.
# A disabled (already voted) or hidden button is never clicked; a focused button keeps Space and Enter.
SHORTCUTS = """
<script>
document.addEventListener("keydown", (event) => {
  const t = event.target;
  if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.isContentEditable)) return;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (t && t.tagName === "BUTTON" && (event.key === " " || event.key === "Enter")) return;
  const ids = {"1": "vote-left", "ArrowLeft": "vote-left", "2": "vote-right", "ArrowRight": "vote-right",
               "3": "vote-tie", "t": "vote-tie", "4": "vote-both-bad", "b": "vote-both-bad",
               " ": "next-pair", "n": "next-pair", "N": "next-pair"};
  const id = ids[event.key];
  const button = id && document.getElementById(id);
  if (button && !button.disabled && button.offsetParent !== null) { event.preventDefault(); button.click(); }
});
</script>
"""



# On a narrow screen the two columns stack; each image box then fits its image's width instead of keeping a
# display-size-high box around a screen-wide image (half of a phone's screen would be empty).
NARROW_CSS = """
@media (max-width: 700px) {
  #arena-left, #arena-right, #arena-left .image-container, #arena-right .image-container,
  #arena-left .image-frame, #arena-right .image-frame,
  #arena-left .image-container > button, #arena-right .image-container > button { height: auto !important; }
  #arena-left img, #arena-right img { width: 100%; height: auto !important; max-height: 80vh; object-fit: contain; }
  #arena-title h2 { font-size: 1.1em; }
}
"""


def page_css(options: PageOptions) -> str:
    """The page's CSS: the picked side's caption highlighted, a caption's line kept when empty, phone layout.

    With ``nearest`` the browser keeps scaled pixel art crisp too, should it scale the image again.
    """
    css = (f".{CAPTION_CLASS} {{ min-height: 1.8em; padding: 0 0.5em; border-radius: 8px; }}\n"
           f".{CAPTION_CLASS} h3, #arena-prompt h3, #arena-title h2 {{ margin: 0.2em 0; }}\n"
           f".{PICKED_CLASS} {{ background: #dcfce7; outline: 2px solid #16a34a; }}\n" + NARROW_CSS)
    if options.upscale == "nearest":
        css += "#arena-left img, #arena-right img { image-rendering: pixelated; }\n"
    return css
