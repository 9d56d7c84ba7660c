"""Webhooks as OpenAI's (`client.webhooks`): a tenant's endpoints (`endpoints`), the events a job's
end writes to an outbox in the transaction of its status change (`outbox`), and their signed,
retried delivery (`delivery`) to targets checked against private addresses (`addresses`).
Torch-free and FastAPI-free: the API's routes and the worker's dispatcher both call in here."""
