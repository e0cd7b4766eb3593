"""Run reports: PNG plots of one run or of several methods x seeds (`opdkit.report.plots`) and one self-contained
HTML file with embedded images (`opdkit.report.html`). matplotlib is imported only when a plot is drawn."""

from opdkit.report.html import markdown_table, markdown_to_html, write_html
from opdkit.report.plots import HIST_EDGES, method_colors, plot_compare, plot_run, reward_histogram

__all__ = ["HIST_EDGES", "markdown_table", "markdown_to_html", "method_colors", "plot_compare", "plot_run",
           "reward_histogram", "write_html"]
