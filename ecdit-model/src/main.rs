fn main() -> anyhow::Result<()> {
    let registry = ecdit_model::registry()?;
    println!("{} components", registry.list().len());
    Ok(())
}
