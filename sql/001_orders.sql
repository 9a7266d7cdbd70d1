-- Orders of the online shop: the input of the payments report.
-- Totals are integer amounts (cents or whole units, the shop's choice), never negative;
-- the report sums them into 64-bit values.
CREATE TABLE orders (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     integer     NOT NULL,
    total       integer     NOT NULL CHECK (total >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);
