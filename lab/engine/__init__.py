"""The engine: sessions advanced one step at a time (scheduler), the db a handler gets (proxy, and the
transactions, prepared statements and cursors it hands out: resources), who moves next (schedules,
exploration, search), what happened (trace, timeline), and the clocks a run keeps."""
