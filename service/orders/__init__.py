"""OrderService: orders, their items and status machine, pages and bulk
export and import."""
