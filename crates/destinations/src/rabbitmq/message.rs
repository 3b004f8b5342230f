//! How events become RabbitMQ messages: the routing key each event gets from the template.

/// Fills a routing-key template (checked at startup) for one event.
pub fn render_routing_key(
    template: &str,
    tenant: &str,
    action: &str,
    outcome: &str,
    source: &str,
) -> String {
    template
        .replace("{tenant}", tenant)
        .replace("{action}", action)
        .replace("{outcome}", outcome)
        .replace("{source}", source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_render() {
        assert_eq!(
            render_routing_key("{tenant}.{action}", "acme", "user.login", "success", "auth"),
            "acme.user.login"
        );
    }
}
