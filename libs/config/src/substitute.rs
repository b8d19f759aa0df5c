//! `${VAR}` and `${VAR:-default}` in configuration files, as the seed's examples write them.

/// Replaces `${VAR}` and `${VAR:-default}` in `text` with values from `lookup`.
///
/// `$${` stands for a literal `${`. A variable that is unset (or, with `:-`, unset or empty)
/// takes the default; `${VAR}` of an unset variable is an error naming it, so a typo does not
/// become an empty value silently.
pub fn substitute_env(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
            continue;
        }
        let Some(body_and_tail) = after.strip_prefix("${") else {
            out.push('$');
            rest = &after[1..];
            continue;
        };
        let end = body_and_tail
            .find('}')
            .ok_or_else(|| format!("unclosed `${{` in `{}`", first_line(after)))?;
        let body = &body_and_tail[..end];
        let (name, default) = match body.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (body, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("`${{{body}}}` is not a variable reference"));
        }
        let value = match (lookup(name), default) {
            (Some(value), Some(default)) if value.is_empty() => default.to_owned(),
            (Some(value), _) => value,
            (None, Some(default)) => default.to_owned(),
            (None, None) => {
                return Err(format!(
                    "environment variable {name} is not set; write ${{{name}:-default}} to give it a default"
                ));
            }
        };
        out.push_str(&value);
        rest = &body_and_tail[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "MODE" => Some("container_agentic".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn set_unset_and_empty_variables() {
        assert_eq!(
            substitute_env("m: ${MODE:-process_pool}", env).unwrap(),
            "m: container_agentic"
        );
        assert_eq!(
            substitute_env("m: ${UNSET:-process_pool}", env).unwrap(),
            "m: process_pool"
        );
        assert_eq!(substitute_env("m: ${EMPTY:-x}", env).unwrap(), "m: x");
        assert_eq!(substitute_env("m: ${EMPTY}", env).unwrap(), "m: ");
        assert_eq!(
            substitute_env("cost: $5 and $${HOME}", env).unwrap(),
            "cost: $5 and ${HOME}"
        );
    }

    #[test]
    fn an_unset_variable_without_default_is_named() {
        let err = substitute_env("m: ${NOPE}", env).unwrap_err();
        assert!(err.contains("NOPE"), "{err}");
        assert!(substitute_env("m: ${MODE", env).is_err());
        assert!(substitute_env("m: ${not valid}", env).is_err());
    }
}
