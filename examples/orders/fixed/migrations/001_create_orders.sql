-- The order service's tables, and the stock it sells from.
CREATE TABLE orders (
    id           bigserial PRIMARY KEY,
    request_id   text NOT NULL,                -- the client's Idempotency-Key
    customer     text NOT NULL,
    sku          text NOT NULL,
    amount_cents int NOT NULL,
    status       text NOT NULL DEFAULT 'new',  -- new | paid
    charge_id    text
);
CREATE INDEX orders_request_id ON orders (request_id);

CREATE TABLE stock (
    sku      text PRIMARY KEY,
    on_hand  int NOT NULL,
    reserved int NOT NULL DEFAULT 0
);

CREATE TABLE processed_events (             -- the order.paid events the stock consumer has applied
    event_id text NOT NULL
);

INSERT INTO stock (sku, on_hand) VALUES ('book', 10), ('lamp', 3);
