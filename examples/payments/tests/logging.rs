//! What the app logs about its configuration.

/// Guards: no form of a database URL leaks its password into the log.
#[test]
fn database_urls_are_logged_without_secrets() {
    for (url, logged) in [
        (
            "postgres://u:secret@db.internal:5432/payments",
            "postgres://db.internal:5432/payments",
        ),
        (
            "postgres://db.internal/payments?user=u&password=secret",
            "postgres://db.internal/payments",
        ),
        (
            "postgres://u@db.internal/payments?sslpassword=secret&sslmode=require",
            "postgres://db.internal/payments",
        ),
        (
            "postgresql:///payments?host=/run/postgresql&password=secret",
            "postgresql:///payments",
        ),
        ("sqlite://payments.db?mode=rwc", "sqlite://payments.db"),
    ] {
        let shown = payments::loggable_database_url(url);
        assert!(!shown.contains("secret"), "{url} logged as {shown}");
        assert_eq!(shown, logged, "{url}");
    }
    assert_eq!(
        payments::loggable_database_url("not a url"),
        "(unparsable database URL)"
    );
}
