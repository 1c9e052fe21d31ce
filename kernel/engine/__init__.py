"""Engine: loading days. The runtime (what one process holds), jobs (a load's snapshot of its
source), the ingest pipeline, the planner of windows, backfills, sliced fetches and the state
store. Imports core and the plugin manager, never the service, bus, HTTP or CLI layers."""
