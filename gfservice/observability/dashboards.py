# grafana-foundation-sdk's enums are enum.StrEnum (Python 3.11+), which mypy reads as str under the project's
# python_version 3.10, and its builder lists are invariant: its argument types cannot be checked here.
# mypy: disable-error-code="arg-type,assignment"
"""gfservice's Grafana dashboards as code (grafana-foundation-sdk 0.0.21, the optional extra ``gfservice[grafana]``).

Three dashboards, each with the Prometheus data source as the template variable ``datasource``:

- *gfservice / Run health* (``run-health.json``): one run, chosen by the ``run`` variable: status, the training
  curves, gradient flow across depth as a heatmap, the capped per-layer series, findings and alerts.
- *gfservice / Fleet* (``fleet.json``): every run at a glance: state (live, finished, stale), last step,
  active findings, alerts firing.
- *gfservice / Service* (``service.json``): the service itself: ingest, rejections, drops, latency, detector
  time and errors, scrape health, memory against its budget, evictions, export errors, disabled detectors.

Write them (an installed gfservice can; the repository commits the JSON in ``dashboards/``, and
``tests/test_dashboards.py`` fails when it drifts from this module)::

    gfservice dashboards render --out DIR   # default ./dashboards; --check only compares (exit 1 on drift)
    python -m dashboards.build              # in a checkout: regenerate the committed dashboards/*.json

Without grafana-foundation-sdk, ``gfservice dashboards render`` writes the JSON this gfservice ships (what this
module built when it was released; :mod:`gfservice.observability.assets` reads it) and says so.

Every query uses only the metric names of the exporter's contract (prefix ``gradflow_``, label ``run``) plus
Prometheus' own ``ALERTS``, ``up`` and ``scrape_*`` series. A panel whose query may rightly return nothing
(no alert firing, no GradScaler) says so in its ``noValue`` text; its checker
(``tests/dashboards_check.py``) reads it.

>>> state_expr('run="a"')[:45]
'max by (run) (gradflow_run_finished{run="a"})'
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gfservice.observability import assets
from gfservice.observability.conventions import DATASOURCE_UID, STALL_AFTER_S

if TYPE_CHECKING:  # imported for real by _load_sdk(), on first build: the command line starts without it
    from grafana_foundation_sdk.builders import common as cb
    from grafana_foundation_sdk.builders import dashboard as dash
    from grafana_foundation_sdk.builders import heatmap, prometheus, stat, table, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common
    from grafana_foundation_sdk.models import dashboard as dm
    from grafana_foundation_sdk.models import heatmap as hm
    from grafana_foundation_sdk.models.prometheus import PromQueryFormat

#: A run that has not finished and has merged no step for this long counts as stale (the TrainingStalled alert's
#: limit: both read :data:`gfservice.observability.conventions.STALL_AFTER_S`).
STALE_AFTER_S = STALL_AFTER_S
#: Dashboard uids (stable: links, provisioning and ``gfservice grafana push`` rely on them).
UIDS = {"run-health": "gfservice-run-health", "fleet": "gfservice-fleet", "service": "gfservice-service"}
TAGS = ["gfservice", "gradients"]
#: Where ``gfservice dashboards render`` writes by default.
DEFAULT_OUT = Path("dashboards")

#: The panels' data source: the dashboard variable ``datasource`` (set by _load_sdk()).
DS: common.DataSourceRef
R = 'run="$run"'  # the label matcher of the chosen run

COLORS = {"live": "green", "finished": "blue", "stale": "orange"}


# ---- small builders ------------------------------------------------------------------------------------------
def q(expr: str, legend: str = "", *, instant: bool = False, as_table: bool = False) -> prometheus.Dataquery:
    """A Prometheus target (range query unless ``instant``)."""
    target = prometheus.Dataquery().expr(expr).datasource(DS)
    target = target.instant() if instant else target.range()
    if legend:
        target = target.legend_format(legend)
    if as_table:
        target = target.format(PromQueryFormat.TABLE)
    return target


def _targets(panel: Any, queries: Sequence[prometheus.Dataquery]) -> Any:
    for ref, target in zip("ABCDEFGHIJ", queries, strict=False):
        panel = panel.with_target(target.ref_id(ref))
    return panel


def thresholds(*steps: tuple[float | None, str]) -> dash.ThresholdsConfig:
    return dash.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(
        [dm.Threshold(value=v, color=c) for v, c in steps]
    )


def value_map(mapping: dict[str, tuple[str, str]]) -> list[dm.ValueMap]:
    return [dm.ValueMap(options={k: dm.ValueMappingResult(text=t, color=c, index=i)
                                 for i, (k, (t, c)) in enumerate(mapping.items())})]


def ts(
    title: str,
    description: str,
    *queries: prometheus.Dataquery,
    unit: str = "none",
    log: int | None = None,
    w: int = 12,
    h: int = 8,
    bars: bool = False,
    stack: bool = False,
    legend_right: bool = False,
    no_value: str | None = None,
) -> timeseries.Panel:
    """A time series panel."""
    p = (
        timeseries.Panel().title(title).description(description).datasource(DS).unit(unit).span(w).height(h)
        .line_width(1).fill_opacity(10 if not bars else 60).show_points(common.VisibilityMode.NEVER)
        .tooltip(cb.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING))
    )
    legend = cb.VizLegendOptions().show_legend(True)
    if legend_right:
        legend = (legend.display_mode(common.LegendDisplayMode.TABLE).placement(common.LegendPlacement.RIGHT)
                  .calcs(["lastNotNull", "max"]).sort_by("Last *").sort_desc(True))
    else:
        legend = legend.display_mode(common.LegendDisplayMode.LIST).placement(common.LegendPlacement.BOTTOM)
    p = p.legend(legend)
    if log:
        p = p.scale_distribution(cb.ScaleDistributionConfig().type(common.ScaleDistribution.LOG).log(log))
    if bars:
        p = p.draw_style(common.GraphDrawStyle.BARS)
    if stack:
        p = p.stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL))
    if no_value:
        p = p.no_value(no_value)
    return _targets(p, queries)


def single(
    title: str,
    description: str,
    target: prometheus.Dataquery,
    *,
    unit: str = "none",
    w: int = 3,
    h: int = 4,
    steps: Sequence[tuple[float | None, str]] = ((None, "green"),),
    mapping: dict[str, tuple[str, str]] | None = None,
    no_value: str | None = None,
    text_mode: common.BigValueTextMode | None = None,
) -> stat.Panel:
    """A stat panel showing the last value of one query (``text_mode`` defaults to the value alone)."""
    if text_mode is None:
        text_mode = common.BigValueTextMode.VALUE
    p = (
        stat.Panel().title(title).description(description).datasource(DS).unit(unit).span(w).height(h)
        .color_mode(common.BigValueColorMode.BACKGROUND).graph_mode(common.BigValueGraphMode.NONE)
        .text_mode(text_mode).reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .thresholds(thresholds(*steps))
    )
    if mapping:
        p = p.mappings(value_map(mapping))
    if no_value:
        p = p.no_value(no_value)
    return _targets(p, [target])


def grid(
    title: str,
    description: str,
    *queries: prometheus.Dataquery,
    exclude: Sequence[str] = ("Time", "__name__", "instance", "job"),
    rename: dict[str, str] | None = None,
    order: Sequence[str] = (),
    merge: bool = False,
    w: int = 24,
    h: int = 8,
    no_value: str | None = None,
) -> table.Panel:
    """A table of instant queries (labels become columns)."""
    p = table.Panel().title(title).description(description).datasource(DS).span(w).height(h)
    if merge:
        p = p.with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
    p = p.with_transformation(dm.DataTransformerConfig(id_val="organize", options={
        "excludeByName": {name: True for name in exclude},
        "renameByName": dict(rename or {}),
        "indexByName": {name: i for i, name in enumerate(order)},
    }))
    if no_value:
        p = p.no_value(no_value)
    return _targets(p, queries)


def row(title: str) -> dash.Row:
    return dash.Row(title)


def datasource_variable() -> dash.DatasourceVariable:
    return (
        dash.DatasourceVariable("datasource").label("Data source").type("prometheus")
        .current(dm.VariableOption(selected=True, text="gfservice Prometheus", value=DATASOURCE_UID))
    )


def run_variable() -> dash.QueryVariable:
    return (
        dash.QueryVariable("run").label("Run").datasource(DS)
        .query({"query": "label_values(gradflow_last_step, run)", "refId": "PrometheusVariableQueryEditor-run"})
        .definition("label_values(gradflow_last_step, run)")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)
    )


def state_expr(selector: str = "") -> str:
    """PromQL for a run's state: 0 live, 1 finished, 2 stale (not finished, no step for STALE_AFTER_S)."""
    sel = "{" + selector + "}" if selector else ""
    finished = f"max by (run) (gradflow_run_finished{sel})"
    quiet = f"(max by (run) (time() - gradflow_last_step_timestamp_seconds{sel}) > bool {STALE_AFTER_S})"
    return f"{finished} + 2 * ({quiet} * (1 - {finished}))"


STATE_MAP = {"0": ("live", COLORS["live"]), "1": ("finished", COLORS["finished"]), "2": ("stale", COLORS["stale"])}


def _dashboard(key: str, title: str, description: str) -> dash.Dashboard:
    return (
        dash.Dashboard(title).uid(UIDS[key]).description(description).tags(TAGS).editable()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR).time("now-1h", "now").refresh("30s")
        .timezone("browser").with_variable(datasource_variable())
    )


def _links() -> list[dash.DashboardLink]:
    return [
        dash.DashboardLink("gfservice").type(dm.DashboardLinkType.DASHBOARDS).tags(["gfservice"])
        .as_dropdown(True).include_vars(True).keep_time(True)
        .placement(None)  # the top bar, not the SDK's default controls menu
    ]


# ---- Run health ----------------------------------------------------------------------------------------------
def run_health() -> dash.Dashboard:
    d = (
        _dashboard("run-health", "gfservice / Run health",
                   "One training run: gradient norm, loss, learning rate, gradient flow across depth, findings.")
        .with_variable(run_variable())
        .links(_links())
        .annotation(
            dash.AnnotationQuery().name("Findings").datasource(DS).enable(True).icon_color("orange")
            .expr(f"gradflow_finding{{{R}}}").title_format("{{detector}} ({{severity}})")
            .text_format("{{layers}} {{ranks}}").step("$__interval")
            .placement(None)  # a toggle in the top bar
        )
        .with_row(row("Status"))
        .with_panel(single("State", f"live: merging steps; finished: the job closed its monitor; stale: no step "
                           f"for {STALE_AFTER_S} s and not finished.", q(state_expr(R)), mapping=STATE_MAP,
                           text_mode=common.BigValueTextMode.VALUE))
        .with_panel(single("Last step", "Last merged training step.", q(f"gradflow_last_step{{{R}}}"),
                           steps=((None, "blue"),)))
        .with_panel(single("Since last step", "Seconds since the last merged step.",
                           q(f"time() - max(gradflow_last_step_timestamp_seconds{{{R}}})"), unit="s",
                           steps=((None, "green"), (60, "orange"), (STALE_AFTER_S, "red"))))
        .with_panel(single("Active findings", "Findings active now, all detectors and severities.",
                           q(f"sum(gradflow_active_findings{{{R}}}) or vector(0)"),
                           steps=((None, "green"), (1, "orange"))))
        .with_panel(single("Alerts firing", "Prometheus alerts firing for this run.",
                           q(f'count(ALERTS{{{R}, alertstate="firing"}}) or vector(0)'),
                           steps=((None, "green"), (1, "red"))))
        .with_panel(single("Non-finite layers", "Layers with NaN/Inf gradients in the last merged step.",
                           q(f"max(gradflow_nonfinite_layers{{{R}}})"), steps=((None, "green"), (1, "red"))))
        .with_panel(single("Stalled ranks", "Ranks that stopped reporting.", q(f"max(gradflow_stalled_ranks{{{R}}})"),
                           steps=((None, "green"), (1, "orange"))))
        .with_panel(single("Reports dropped", "Reports the training processes dropped before they reached the "
                           "service (queue full or service away); training itself is not slowed.",
                           q(f"sum(gradflow_reports_dropped_total{{{R}}})"), steps=((None, "green"), (1, "orange"))))
        .with_row(row("Training"))
        .with_panel(ts("Global gradient norm", "L2 norm over all layers of each merged step (log scale); "
                       "findings are marked as annotations.", q(f"gradflow_grad_norm{{{R}}}", "global norm"), log=10))
        .with_panel(ts("Loss", "Loss the training loop passed to monitor.step().", q(f"gradflow_loss{{{R}}}", "loss")))
        .with_panel(ts("Learning rate", "Learning rate of the first parameter group.",
                       q(f"gradflow_learning_rate{{{R}}}", "lr"), unit="none", h=7))
        .with_panel(ts("Loss scale", "Mixed-precision loss scale of the GradScaler (log2 scale): drops mark "
                       "steps the scaler skipped.", q(f"gradflow_loss_scale{{{R}}}", "loss scale"), log=2, h=7,
                       no_value="no GradScaler in this run"))
        .with_panel(ts("Gradient noise scale", "B_simple = tr(Sigma)/|G|^2 in per-rank batches (McCandlish et al. "
                       "2018), estimated at each step from the DDP ranks' local (pre-allreduce) gradient norms and "
                       "the merged one (log scale; one step's estimate is noisy: read the trend). A global batch far "
                       "above it (in the same units: the number of ranks) gives diminishing returns.",
                       q(f"gradflow_noise_scale{{{R}}}", "B_simple (per-rank batches)"), log=10, w=24, h=7,
                       no_value="needs 2+ DDP ranks reporting local gradient norms"))
        .with_panel(ts("Steps skipped by the guard", "Steps whose optimizer update the guard skipped (guard mode: "
                       "gfservice.monitor(..., guard=True)), per 5 minutes, by reason: NaN/Inf gradients or loss, or a "
                       "gradient norm far above the run's recent history. Each skip kept a poisoned step off the "
                       "weights.", q(f"sum by (reason) (increase(gradflow_steps_skipped_total{{{R}}}[5m]))",
                                     "{{reason}}"), bars=True, stack=True, w=24, h=7,
                       no_value="no guard in this run"))
        .with_row(row("Gradient flow"))
        .with_panel(
            _targets(
                heatmap.Panel().title("Gradient flow across depth (log10 RMS gradient)").description(
                    "Each row is one of a fixed number of contiguous depth buckets of the model's parameters, "
                    "input (00) at the bottom, output at the top; colour is log10 of the bucket's RMS gradient. "
                    "A band going dark from the bottom up is vanishing; a bright band is exploding.")
                .datasource(DS).span(24).height(10).calculate(False)
                .rows_frame(heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.UNKNOWN).value("log10 RMS"))
                .color(heatmap.HeatmapColorOptions().mode(hm.HeatmapColorMode.SCHEME).scheme("Viridis")
                       .scale(hm.HeatmapColorScale.LINEAR).steps(64).reverse(False).exponent(0.5)
                       .fill("dark-orange"))
                .y_axis(heatmap.YAxisConfig().axis_label("depth bucket (input to output)").reverse(False))
                .cell_values(heatmap.CellValues().decimals(2))
                # The SDK's default hides cells <= 1e-9 (zero counts); log10 RMS values are negative: hide none.
                .filter_values(heatmap.FilterValueRange().le(-1e30))
                .cell_gap(0).show_legend()
                .tooltip(heatmap.HeatmapTooltip().mode(common.TooltipDisplayMode.SINGLE).y_histogram(False)
                         .show_color_scale(True)),
                [q(f"log10(gradflow_depth_grad_rms{{{R}}} > 0)", "{{bucket}}")],
            )
        )
        .with_panel(ts("Per-layer gradient norm (capped set of layers)",
                       "L2 gradient norm of a capped set of layers: evenly spaced across depth, the first and last "
                       "layer, and layers named in active findings.",
                       q(f"gradflow_layer_grad_norm{{{R}}}", "{{layer}}"), log=10, w=24, h=10, legend_right=True))
        .with_row(row("Findings and alerts"))
        .with_panel(grid("Active findings (details)", "Findings active now (kept a few minutes after they clear). "
                         "'since step' is the step the finding was first raised.",
                         q(f"gradflow_finding{{{R}}}", instant=True, as_table=True),
                         exclude=("Time", "__name__", "instance", "job", "run"),
                         rename={"Value": "since step"},
                         order=("severity", "detector", "key", "layers", "ranks", "Value"),
                         no_value="no active finding"))
        .with_panel(ts("Active findings by detector", "Number of active findings over time.",
                       q(f"sum by (detector, severity) (gradflow_active_findings{{{R}}})",
                         "{{detector}} ({{severity}})"), stack=True))
        .with_panel(ts("Findings raised (cumulative)", "Findings raised so far, by detector and severity.",
                       q(f"sum by (detector, severity) (gradflow_findings_total{{{R}}})",
                         "{{detector}} ({{severity}})"), no_value="no finding raised"))
        .with_panel(grid("Alerts", "Prometheus alerts of this run, pending or firing.",
                         q(f"ALERTS{{{R}}}", instant=True, as_table=True),
                         exclude=("Time", "__name__", "Value", "instance", "job", "run"),
                         order=("alertname", "alertstate", "severity"), no_value="no alert pending or firing"))
    )
    return d


# ---- Fleet ---------------------------------------------------------------------------------------------------
def fleet() -> dash.Dashboard:
    link = {
        "title": "Open run health",
        "url": f"/d/{UIDS['run-health']}?var-run=${{__value.raw}}&${{datasource:queryparam}}&${{__url_time_range}}",
    }
    runs = grid(
        "Runs", "Every run the service knows: click a run to open its Run health dashboard.",
        q(state_expr(), instant=True, as_table=True),
        q("max by (run) (gradflow_last_step)", instant=True, as_table=True),
        q("time() - max by (run) (gradflow_last_step_timestamp_seconds)", instant=True, as_table=True),
        q("sum by (run) (gradflow_active_findings)", instant=True, as_table=True),
        q('count by (run) (ALERTS{alertstate="firing", run!=""}) or on (run) (0 * max by (run) (gradflow_last_step))',
          instant=True, as_table=True),
        q("max by (run) (gradflow_run_world_size)", instant=True, as_table=True),
        merge=True, exclude=("Time",), h=10,
        rename={"Value #A": "state", "Value #B": "last step", "Value #C": "since last step",
                "Value #D": "active findings", "Value #E": "alerts firing", "Value #F": "world size"},
        order=("run", "Value #A", "Value #B", "Value #C", "Value #D", "Value #E", "Value #F"),
    )
    runs = (
        runs.override_by_name("run", [dm.DynamicConfigValue(id_val="links", value=[link])])
        .override_by_name("state", [
            dm.DynamicConfigValue(id_val="mappings", value=[m.to_json() for m in value_map(STATE_MAP)]),
            dm.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-background"}),
        ])
        .override_by_name("since last step", [dm.DynamicConfigValue(id_val="unit", value="s")])
        .override_by_name("active findings", [
            dm.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-text"}),
            dm.DynamicConfigValue(id_val="thresholds", value=thresholds((None, "green"), (1, "orange")).build()),
        ])
        .override_by_name("alerts firing", [
            dm.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-text"}),
            dm.DynamicConfigValue(id_val="thresholds", value=thresholds((None, "green"), (1, "red")).build()),
        ])
    )
    state = state_expr()
    d = (
        _dashboard("fleet", "gfservice / Fleet", "Every training run the gfservice service watches, at a glance.")
        .links(_links())
        .with_panel(single("Runs watched", "Runs the service tracks.", q("count(gradflow_last_step) or vector(0)"), w=4,
                           steps=((None, "blue"),)))
        .with_panel(single("Live", "Runs merging steps.", q(f"count(({state}) == 0) or vector(0)"), w=4,
                           steps=((None, COLORS["live"]),)))
        .with_panel(single("Finished", "Runs whose training job closed its monitor.",
                           q(f"count(({state}) == 1) or vector(0)"), w=4, steps=((None, COLORS["finished"]),)))
        .with_panel(single("Stale", f"Runs not finished and without a new step for {STALE_AFTER_S} s.",
                           q(f"count(({state}) == 2) or vector(0)"), w=4,
                           steps=((None, "green"), (1, COLORS["stale"]))))
        .with_panel(single("Runs with findings", "Runs with at least one active finding.",
                           q("count(sum by (run) (gradflow_active_findings) > 0) or vector(0)"), w=4,
                           steps=((None, "green"), (1, "orange"))))
        .with_panel(single("Alerts firing", "gfservice run alerts firing now.",
                           q('count(ALERTS{alertstate="firing", run!=""}) or vector(0)'), w=4,
                           steps=((None, "green"), (1, "red"))))
        .with_panel(runs)
        .with_panel(grid("Stale runs", f"Runs not finished whose last step is older than {STALE_AFTER_S} s: "
                         "the job hangs, died without closing its monitor, or lost the service.",
                         q(f"(time() - max by (run) (gradflow_last_step_timestamp_seconds)) > {STALE_AFTER_S} "
                           "unless on (run) (max by (run) (gradflow_run_finished) == 1)", instant=True, as_table=True),
                         exclude=("Time",), rename={"Value": "seconds since last step"}, w=12,
                         no_value="no stale run"))
        .with_panel(grid("Run alerts firing", "Run alerts firing now.",
                         q('ALERTS{alertstate="firing", run!=""}', instant=True, as_table=True),
                         exclude=("Time", "__name__", "Value", "alertstate", "instance", "job"),
                         order=("run", "alertname", "severity"), w=12, no_value="no alert firing"))
        .with_panel(grid("Active findings, all runs", "Every active finding; 'since step' is its first step.",
                         q("gradflow_finding", instant=True, as_table=True),
                         exclude=("Time", "__name__", "instance", "job"), rename={"Value": "since step"},
                         order=("run", "severity", "detector", "key", "layers", "ranks", "Value"),
                         no_value="no active finding"))
        .with_panel(ts("Last step by run", "Training progress of each run.",
                       q("max by (run) (gradflow_last_step)", "{{run}}")))
        .with_panel(ts("Global gradient norm by run", "Global gradient norm of each run (log scale).",
                       q("max by (run) (gradflow_grad_norm)", "{{run}}"), log=10))
    )
    return d


# ---- Service -------------------------------------------------------------------------------------------------
def service() -> dash.Dashboard:
    rate = "[$__rate_interval]"
    d = (
        _dashboard("service", "gfservice / Service", "The gfservice service: ingest, rejections, drops, latency, "
                   "detector cost, and Prometheus' view of the scrape.")
        .links(_links())
        .with_panel(single("Scrape target up", "Whether Prometheus scrapes the service (job gfservice).",
                           q('min(up{job="gfservice"})'), w=4, mapping={"0": ("down", "red"), "1": ("up", "green")},
                           steps=((None, "red"), (1, "green"))))
        .with_panel(single("Runs tracked", "Runs the service holds in memory (every shard of a fleet).",
                           q("sum(gradflow_runs)"), w=4,
                           steps=((None, "blue"),)))
        .with_panel(single("Accepted / s", "Messages accepted per second.",
                           q(f"sum(rate(gradflow_messages_accepted_total{rate}))"), unit="reqps", w=4,
                           steps=((None, "blue"),)))
        .with_panel(single("Rejected / s", "Messages rejected per second, all reasons.",
                           q(f"sum(rate(gradflow_messages_rejected_total{rate})) or vector(0)"), unit="reqps", w=4,
                           steps=((None, "green"), (0.001, "orange"))))
        .with_panel(single("Scrape duration", "How long Prometheus' last scrape of the service took.",
                           q('max(scrape_duration_seconds{job="gfservice"})'), unit="s", w=4,
                           steps=((None, "green"), (1, "orange"), (5, "red"))))
        .with_panel(single("Version", "gfservice version the service runs.", q("gradflow_build_info", "{{version}}"),
                           w=4, text_mode=common.BigValueTextMode.NAME, steps=((None, "blue"),)))
        .with_panel(ts("Messages accepted", "Layouts and step reports accepted per second.",
                       q(f"sum(rate(gradflow_messages_accepted_total{rate}))", "accepted"), unit="reqps"))
        .with_panel(ts("Rejections by reason", "Messages rejected per second, by reason (invalid, oversized, "
                       "unknown_run, shape_mismatch, stale_step, duplicate, ...).",
                       q(f"sum by (reason) (rate(gradflow_messages_rejected_total{rate}))", "{{reason}}"),
                       q(f"sum(rate(gradflow_messages_rejected_total{rate})) or vector(0)", "all reasons"),
                       unit="reqps"))
        .with_panel(ts("Reports dropped by senders", "Reports the training processes dropped before they reached "
                       "the service, per second and run.",
                       q(f"sum by (run) (rate(gradflow_reports_dropped_total{rate}))", "{{run}}"),
                       q(f"sum(rate(gradflow_reports_dropped_total{rate})) or vector(0)", "all runs"), unit="reqps"))
        .with_panel(ts("Ingest latency (mean)", "Mean time the aggregator spends on one message.",
                       q(f"sum(rate(gradflow_ingest_latency_seconds_sum{rate})) "
                         f"/ sum(rate(gradflow_ingest_latency_seconds_count{rate}))", "mean"), unit="s"))
        .with_panel(ts("Detector time (share of one core)", "Seconds spent in each detector per second.",
                       q(f"sum by (detector) (rate(gradflow_detector_seconds_total{rate}))", "{{detector}}"),
                       unit="percentunit"))
        .with_panel(ts("Detector errors", "Exceptions raised by detectors (each is isolated and counted).",
                       q(f"sum by (detector) (increase(gradflow_detector_errors_total{rate}))", "{{detector}}"),
                       q(f"sum(increase(gradflow_detector_errors_total{rate})) or vector(0)", "all detectors"),
                       bars=True))
        .with_panel(ts("Scrape health", "1 when Prometheus' last scrape of the service succeeded.",
                       q('up{job="gfservice"}', "up {{instance}}"), h=7))
        .with_panel(ts("Scrape duration and size", "Seconds per scrape (left) and samples per scrape: the series "
                       "count, bounded whatever the model size.",
                       q('scrape_duration_seconds{job="gfservice"}', "duration {{instance}}"),
                       q('scrape_samples_scraped{job="gfservice"}', "samples {{instance}}"), unit="s", h=7)
                   .override_by_query("B", [dm.DynamicConfigValue(id_val="unit", value="short"),
                                            dm.DynamicConfigValue(id_val="custom.axisPlacement", value="right")]))
        # The service protecting itself (the tickets GradflowRunsEvicted, GradflowExportErrors and
        # GradflowDetectorDisabled): memory against its budget, evictions, series left out, detectors switched off.
        .with_panel(ts("Memory against its budget", "Bytes all runs hold in the service, and its budget "
                       "([aggregator] max_memory_bytes; absent when unbounded). Past it, runs are evicted.",
                       q("gradflow_memory_bytes", "held {{instance}}"),
                       q("gradflow_memory_limit_bytes", "budget {{instance}}"), unit="bytes", h=7))
        .with_panel(ts("Runs evicted by reason", "Runs the service forgot, by reason: memory (past its memory "
                       "budget: GradflowRunsEvicted), max_runs, finished_ttl (finished runs retired).",
                       q(f"sum by (reason) (increase(gradflow_runs_evicted_total{rate}))", "{{reason}}"),
                       bars=True, h=7))
        .with_panel(ts("Export errors", "Series the exporter left out of a scrape, by reason: run (a run missing "
                       "from /metrics: GradflowExportErrors), service, duplicate_series (one of them kept).",
                       q(f"sum by (reason) (increase(gradflow_export_errors_total{rate}))", "{{reason}}"),
                       bars=True, h=7))
        .with_panel(ts("Detectors disabled", "Runs on which each detector is switched off, by why (errors: past "
                       "its error budget; time: past its time budget): GradflowDetectorDisabled.",
                       q("count by (detector, reason) (gradflow_detector_disabled == 1)", "{{detector}} ({{reason}})"),
                       q("count(gradflow_detector_disabled == 1) or vector(0)", "all detectors"), h=7))
        .with_panel(ts("Runs tracked over time", "Runs held by the service (every shard of a fleet).",
                       q("sum(gradflow_runs)", "runs"),
                       w=24, h=6))
    )
    return d


DASHBOARDS = {"run-health": run_health, "fleet": fleet, "service": service}


class DashboardSdkMissing(ImportError):
    """Building the dashboards needs grafana-foundation-sdk (the optional extra ``gfservice[grafana]``)."""


def _load_sdk() -> None:
    """Import grafana-foundation-sdk into this module's globals (the builders above use them), once."""
    global DS, JSONEncoder, PromQueryFormat, cb, common, dash, dm, heatmap, hm, prometheus, stat, table, timeseries
    if "DS" in globals():
        return
    try:
        from grafana_foundation_sdk.builders import common as cb
        from grafana_foundation_sdk.builders import dashboard as dash
        from grafana_foundation_sdk.builders import heatmap, prometheus, stat, table, timeseries
        from grafana_foundation_sdk.cog.encoder import JSONEncoder
        from grafana_foundation_sdk.models import common
        from grafana_foundation_sdk.models import dashboard as dm
        from grafana_foundation_sdk.models import heatmap as hm
        from grafana_foundation_sdk.models.prometheus import PromQueryFormat
    except ImportError as exc:
        raise DashboardSdkMissing("building gfservice's dashboards needs grafana-foundation-sdk 0.0.21: "
                                  "pip install 'gfservice[grafana]'") from exc
    DS = common.DataSourceRef(type_val="prometheus", uid="${datasource}")


def sdk_available() -> bool:
    """Whether grafana-foundation-sdk is installed, i.e. whether :func:`build` can run."""
    try:
        _load_sdk()
    except DashboardSdkMissing:
        return False
    return True


# ---- serialisation -------------------------------------------------------------------------------------------
def build(key: str) -> dict[str, Any]:
    """The dashboard ``key`` (one of :data:`DASHBOARDS`) as a JSON-ready dict, panel ids numbered 1, 2, ..."""
    _load_sdk()
    model = DASHBOARDS[key]().build()
    data = json.loads(json.dumps(model, cls=JSONEncoder))
    n = 0
    for panel in data.get("panels", []):
        n += 1
        panel["id"] = n
        for inner in panel.get("panels", []):
            n += 1
            inner["id"] = n
    data["id"] = None
    data["version"] = 1
    return data


def render(key: str) -> str:
    """The committed text of dashboard ``key``: sorted keys, two-space indent, final newline."""
    return json.dumps(build(key), indent=2, sort_keys=True) + "\n"


def rendered_files(*, packaged: bool | None = None) -> dict[str, str]:
    """File name -> text of every dashboard, built by this module, or the JSON this gfservice ships.

    ``packaged=None`` builds when grafana-foundation-sdk is installed and falls back to the shipped JSON
    otherwise (the same text: the drift test keeps the committed JSON equal to what this module builds).
    """
    if packaged is None:
        packaged = not sdk_available()
    if packaged:
        shipped = assets.dashboards()
        return {f"{key}.json": shipped[key].read_text(encoding="utf-8") for key in DASHBOARDS}
    return {f"{key}.json": render(key) for key in DASHBOARDS}
