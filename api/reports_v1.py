"""GET /api/1.0/report/payments: the synchronous payments report.

The aggregation (jobrunner.aggregate, shared with the v2 worker) reads the orders with
the plain projection of sql/queries/report.sql and sums per user in Python. It is
synchronous and CPU-heavy, so it runs in a thread: the event loop keeps serving other
requests (and long-polls) meanwhile. It reads on the aggregation's own connections
(kept per process by jobrunner.aggregate), never on the API's pool. At most
REPORT_CONCURRENCY reports run at once per process (the others wait their turn), so a
burst of v1 calls cannot exhaust the database's connections or the thread pool.
"""
from __future__ import annotations

import asyncio

import falcon

from jobrunner import aggregate, config

from .openapi import error_responses, json_response

PATH = "/api/1.0/report/payments"


class PaymentsReportV1:
    def __init__(self, context) -> None:
        self.db = context.db
        self.slots = asyncio.Semaphore(max(1, config.env_int("REPORT_CONCURRENCY", 2)))

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        async with self.slots:
            data = await asyncio.to_thread(aggregate.payments, self.db.url)
        resp.media = {"data": data}


OPENAPI = {
    "tags": [{"name": "reports", "description": "Per-user payment totals."}],
    "components": {
        "schemas": {
            "PaymentTotal": {
                "type": "object",
                "required": ["user_id", "total_payment"],
                "additionalProperties": False,
                "properties": {
                    "user_id": {"type": "integer", "minimum": -2147483648, "maximum": 2147483647},
                    "total_payment": {"type": "integer", "minimum": 0,
                                      "description": "sum of the user's order totals"},
                },
            },
            "PaymentTotals": {
                "type": "array",
                "description": "One entry per user with orders, sorted by user_id.",
                "items": {"$ref": "#/components/schemas/PaymentTotal"},
            },
            "PaymentsReport": {
                "type": "object",
                "required": ["data"],
                "additionalProperties": False,
                "properties": {"data": {"$ref": "#/components/schemas/PaymentTotals"}},
            },
        },
    },
    "paths": {
        PATH: {
            "get": {
                "operationId": "getPaymentsReportV1",
                "tags": ["reports"],
                "summary": "Every user's total payment, computed now.",
                "description": "Equals `SELECT user_id, sum(total) FROM orders GROUP BY user_id "
                               "ORDER BY user_id`; users without orders are absent.",
                "responses": {
                    "200": json_response("The report.", {"$ref": "#/components/schemas/PaymentsReport"}),
                    **error_responses(503),
                },
            },
        },
    },
}


def install(app, context) -> None:
    app.add_route(PATH, PaymentsReportV1(context))
