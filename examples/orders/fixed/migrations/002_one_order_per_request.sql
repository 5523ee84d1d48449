-- The fix's migration: the database, not the code, decides that a request id makes one order
-- and that an event is applied once.
DROP INDEX orders_request_id;
CREATE UNIQUE INDEX orders_request_id ON orders (request_id);
ALTER TABLE processed_events ADD PRIMARY KEY (event_id);
