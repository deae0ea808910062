"""The head of the shop's manifest in tests (stores under ``{dir}``, the gateway's two routes,
ports chosen by the system); each test adds its ``services:``. A ``str.format`` template."""

SHOP_HEAD = """
broker: sqlite:///{dir}/events.db
store: sqlite:///{dir}/store.db
admin: {{listen: 127.0.0.1:0}}
gateway:
  listen: 127.0.0.1:0
  routes:
    - {{name: place-order, match: {{path: {{exact: /orders}}, methods: [POST]}}, service: orders}}
    - {{name: read-orders, match: {{path: {{prefix: /orders}}, methods: [GET]}},
       service: orders-view}}
"""
